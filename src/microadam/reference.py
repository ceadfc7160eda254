"""A slow, readable MicroAdam that follows ``docs/algorithm.md`` line by line: the oracle.

It loops over blocks in Python, keeps the error codes unpacked and the window as
a list of per-step selections, and computes in ``compute_dtype`` (float64 by
default). Stored quantities are rounded exactly as the optimizer stores them
(window values to bf16, quantization bounds outward to bf16, codes to 4 bits),
because that rounding is part of the algorithm, not of the implementation.

Only the tie rule of Top-K (lower index wins), the outward bf16 rounding of the
bounds and the counter-based random bits are shared with the fast path; each is
tested on its own in ``tests/test_ops.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from microadam.layout import Layout, layout_for
from microadam.ops.quant import RELEASE_RMS_FLOOR, bf16_ceil, bf16_floor
from microadam.ops.random import STREAM_ERROR, STREAM_PARAM, hash_bits, stream_key
from microadam.ops.rounding import round_to_dtype

__all__ = ["ReferenceMicroAdam", "ReferenceState"]


@dataclass
class ReferenceState:
    step: int
    codes: torch.Tensor  # int64 [numel], 0..15
    lo: torch.Tensor  # [quant_blocks], bf16 values held in compute dtype
    hi: torch.Tensor
    # window[slot] = (indices [blocks, k] int64, values [blocks, k] bf16 values in compute dtype)
    window: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)


class ReferenceMicroAdam:
    """MicroAdam over a list of tensors, one hyperparameter set, no speed tricks.

    Call :meth:`step` with the gradients; parameters are updated in place. Its defaults are
    ``MicroAdam``'s, so ``release=0.5``: pass ``release=0`` for the paper's algorithm.
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        window: int = 10,
        density: float = 0.01,
        block_size: int = 4096,
        quant_block_size: int = 128,
        error_rounding: str = "nearest",
        stochastic_param_rounding: bool = False,
        seed: int = 0,
        compute_dtype: torch.dtype = torch.float64,
        param_indices: list[int] | None = None,
        release: float = 0.5,
        release_scale: float = 1.0,
    ) -> None:
        self.params = params
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.m, self.density, self.B, self.q = window, density, block_size, quant_block_size
        self.error_rounding = error_rounding
        self.release, self.release_scale = release, release_scale
        self.stochastic_param_rounding = stochastic_param_rounding
        self.seed, self.cd = seed, compute_dtype
        self.param_indices = param_indices or list(range(len(params)))
        self.states: list[ReferenceState] = []
        for p in params:
            lay = self._layout(p)
            zeros = torch.zeros(lay.num_quant_blocks, dtype=compute_dtype)
            self.states.append(
                ReferenceState(0, torch.zeros(p.numel(), dtype=torch.int64), zeros, zeros.clone(), [None] * window)
            )

    def _layout(self, p: torch.Tensor) -> Layout:
        return layout_for(p.numel(), block_size=self.B, density=self.density, quant_block_size=self.q, window=self.m)

    def dequantized_error(self, i: int) -> torch.Tensor:
        st, q = self.states[i], self.q
        e = torch.empty(st.codes.numel(), dtype=self.cd)
        for j in range(st.lo.numel()):
            scale = (st.hi[j] - st.lo[j]) / 15
            e[j * q : (j + 1) * q] = st.codes[j * q : (j + 1) * q].to(self.cd) * scale + st.lo[j]
        return e

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor | None]) -> None:
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if g is not None:
                self._step_one(i, p, g)

    def _step_one(self, i: int, p: torch.Tensor, g: torch.Tensor) -> None:
        st, lay, cd = self.states[i], self._layout(p), self.cd
        st.step += 1
        t, d = st.step, p.numel()
        if d == 0:
            return
        err_key = stream_key(self.seed, self.param_indices[i], t, STREAM_ERROR)
        par_key = stream_key(self.seed, self.param_indices[i], t, STREAM_PARAM)

        # 1. a = g + dequant(e)
        a = g.reshape(-1).to(cd) + self.dequantized_error(i)

        # 2-3. per block: the k largest |a| (ties: lower index), stored, then zeroed.
        indices = torch.zeros(lay.num_blocks, lay.k, dtype=torch.int64)
        values = torch.zeros(lay.num_blocks, lay.k, dtype=cd)
        for b in range(lay.num_blocks):
            block = a[b * lay.block : (b + 1) * lay.block]
            order = torch.sort(block.abs(), descending=True, stable=True).indices
            chosen = order[: min(lay.k, block.numel())].sort().values
            indices[b, : chosen.numel()] = chosen
            values[b, : chosen.numel()] = block[chosen].to(torch.bfloat16).to(cd)
            block[chosen] = 0
        st.window[(t - 1) % self.m] = (indices, values)

        # 4. release part of what is left as a dense move (scaled to an RMS of release_scale per
        # block of q), then quantize the rest, per block of q, into 4-bit codes.
        move = torch.zeros(d, dtype=cd)
        for j in range(lay.num_quant_blocks):
            x = a[j * self.q : (j + 1) * self.q]
            if self.release:
                rms = (x * x).sum().div(x.numel()).sqrt()
                if rms >= RELEASE_RMS_FLOOR:  # below it: all zero (see ops.quant)
                    move[j * self.q : (j + 1) * self.q] = x * (self.release_scale / rms)
                x.mul_(1 - self.release) if self.release < 1 else x.zero_()
            lo = bf16_floor(x.min() + 0.0).to(cd)  # -0 becomes +0, as in ops.quant.quantize_blocks
            hi = bf16_ceil(x.max() + 0.0).to(cd)
            scale = (hi - lo) / 15
            if self.error_rounding == "stochastic":
                pos = torch.arange(j * self.q, j * self.q + x.numel())
                r = (hash_bits(pos, err_key) >> 8).to(cd) * 2.0**-24
            else:
                r = 0.5
            if scale > 0:
                codes = ((x - lo) / scale + r).floor().clamp(0, 15)
            else:
                codes = torch.zeros_like(x)
            st.codes[j * self.q : (j + 1) * self.q] = codes.to(torch.int64)
            st.lo[j], st.hi[j] = lo, hi

        # 5. moments from the last min(t, m) slots; slot written `age` steps ago weighs beta^age.
        M = torch.zeros(lay.num_blocks * lay.block, dtype=cd)
        S = torch.zeros(lay.num_blocks * lay.block, dtype=cd)
        # Within a slot the positions are distinct (Top-K picks each index of a block once), so one
        # index_add_ per slot adds exactly what a loop over its entries would, in the same order of slots.
        block_starts = torch.arange(lay.num_blocks).unsqueeze(1) * lay.block
        for age in range(min(t, self.m)):
            idx, val = st.window[(t - 1 - age) % self.m]
            pos = (block_starts + idx).reshape(-1)
            M.index_add_(0, pos, (self.b1**age) * val.reshape(-1))
            S.index_add_(0, pos, (self.b2**age) * val.reshape(-1) * val.reshape(-1))
        M, S = M[:d], S[:d]
        c1 = (1 - self.b1) / (1 - self.b1**t)
        c2 = (1 - self.b2) / (1 - self.b2**t)
        den = (c2 * S).sqrt() + self.eps
        u = torch.where(den > 0, c1 * M / den, 0.0)  # eps == 0 and no entry: no move

        # 6. decoupled weight decay, then the sparse step; round into the parameter's dtype.
        new = p.reshape(-1).to(cd) * (1 - self.lr * self.wd) - self.lr * move - self.lr * u
        bits = None
        if self.stochastic_param_rounding and p.dtype == torch.bfloat16:
            bits = hash_bits(torch.arange(d), par_key)
        p.copy_(round_to_dtype(new, p.dtype, bits).view(p.shape))
