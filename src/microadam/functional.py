"""The math of one MicroAdam step for one tensor, over chunks of whole blocks.

``microadam_step`` is what ``MicroAdam.step`` calls for each parameter (as ``step_in_place``, the
same function without the wrapper that keeps it out of ``torch.compile``); every hyperparameter is
keyword-only and the state tensors are updated in place.
``impl="torch"`` is the vectorized PyTorch path (CPU and CUDA).

Transient memory. The tensor is processed in chunks of ``chunk_size``
elements rounded to whole Top-K and quantization blocks, so a step never holds
a full-size float32 copy of a large tensor: its temporaries (float32 sum and
magnitudes, padded copies, codes, the two moment accumulators) are proportional
to the chunk, plus ``O(window * k * blocks_per_chunk)``
for the window, whatever the tensor's size. Measured (``benchmarks/transient_memory.py``):
60 to 80 bytes per chunk element with nearest error rounding, 120 to 130 with stochastic
(60-130 MB at the default chunk of 2**20); float64 (the testing dtype) doubles it. A
non-contiguous parameter or gradient is first copied whole into a contiguous one.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
from dataclasses import dataclass
from typing import Any

import torch

from microadam.layout import Layout
from microadam.ops.quant import RELEASE_RMS_FLOOR, dequantize_blocks, pack_nibbles, quantize_blocks, unpack_nibbles
from microadam.ops.random import STREAM_ERROR, STREAM_PARAM, hash_bits, stream_key
from microadam.ops.rounding import round_to_dtype
from microadam.ops.topk import block_topk

__all__ = [
    "microadam_step",
    "check_hyperparameters",
    "release_move",
    "compute_dtype",
    "chunk_elements",
    "step_scalars",
    "StepScalars",
    "IMPLEMENTATIONS",
]

IMPLEMENTATIONS = ("torch", "triton", "cpp")

# The step is never compiled: inductor drops the bf16 round trips that round the error bounds outward
# (ops/quant.py), so a compiled step changed the state (measured: 5 steps of impl="torch" moved
# parameters by up to 0.35 lr). Inside a compiled function it runs eagerly. torch._disable_dynamo is
# what torch.optim uses: it imports torch._dynamo at the first call, where torch.compiler.disable, applied
# at import, added about 2 s to `import microadam` (measured).
never_compiled = getattr(torch, "_disable_dynamo", None) or torch.compiler.disable

DEFAULT_CHUNK = 2**20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 parameters compute in float64 (the oracle's precision); all others in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_elements(layout: Layout, chunk_size: int) -> int:
    """Elements per chunk: a multiple of the Top-K block, the quantization block and 2.

    The multiple of 2 keeps packed code bytes from straddling two chunks.
    """
    align = math.lcm(layout.block, layout.quant_block, 2)
    if layout.numel <= max(chunk_size, align):
        return max(layout.numel, 1)
    return max(align, chunk_size // align * align)


def _pad_rows(x: torch.Tensor, rows: int, cols: int, fill: float | None) -> torch.Tensor:
    """View flat ``x`` as ``[rows, cols]``, padding the tail with ``fill`` (or its last value)."""
    pad = rows * cols - x.numel()
    if pad:
        tail = x[-1:].expand(pad) if fill is None else x.new_full((pad,), fill)
        x = torch.cat([x, tail])
    return x.view(rows, cols)


def _slot_ages(step: int, window: int) -> list[tuple[int, int]]:
    """(slot, age) of every valid ring slot at ``step`` (1-based); age 0 was written now."""
    return [((step - 1 - age) % window, age) for age in range(min(step, window))]


def release_move(rest: torch.Tensor, count: torch.Tensor, scale: float) -> torch.Tensor:
    """The dense move of the released error: ``rest * (scale / rms)`` per quantization block.

    ``rest`` is ``[blocks, q]`` (the residual after Top-K, zero-padded), ``count`` the real
    elements of each block. The sum of squares is taken by halving (pad the row to a power of two
    with zeros, then add its two halves until one column is left), an order every implementation
    can repeat exactly; a block whose residual is all zero (an RMS below ``RELEASE_RMS_FLOOR``) does
    not move.
    """
    sq = rest * rest
    width = 1 << max(sq.shape[1] - 1, 0).bit_length()
    if width != sq.shape[1]:
        sq = torch.nn.functional.pad(sq, (0, width - sq.shape[1]))
    while width > 1:
        width //= 2
        sq = sq[:, :width] + sq[:, width:]
    rms = (sq[:, 0] / count).sqrt()
    # RELEASE_RMS_FLOOR: float64's way to "all zero" (see ops.quant).
    inv = torch.where(rms >= RELEASE_RMS_FLOOR, scale / rms, 0.0)
    return rest * inv[:, None]


@dataclass(frozen=True)
class StepScalars:
    """The numbers of one step that every element of a tensor shares.

    Computed once here for every implementation (torch, cpp, triton), so that they cannot drift
    apart: the kernels take them as arguments instead of redoing the arithmetic.
    """

    slots: tuple[int, ...]  # ring slot of each valid age, newest (age 0) first
    w1: tuple[float, ...]  # beta1 ** age, per slot above
    w2: tuple[float, ...]  # beta2 ** age
    write_slot: int  # the slot this step writes
    c1: float  # (1 - beta1) / (1 - beta1 ** step): bias correction of the first moment
    c2: float  # (1 - beta2) / (1 - beta2 ** step)
    decay: float  # 1 - lr * weight_decay
    keep: float  # 1 - release: the part of the residual that stays in the error feedback
    err_key: int  # random stream of the error's stochastic rounding
    par_key: int  # random stream of the parameter's stochastic rounding


def step_scalars(
    *,
    step: int,
    window: int,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    seed: int,
    param_index: int,
    release: float = 0.0,
    keys: bool = True,
) -> StepScalars:
    """The :class:`StepScalars` of ``step`` (1-based) for the tensor ``param_index``.

    ``keys=False`` leaves ``err_key`` and ``par_key`` at 0, for a caller that rounds neither
    stochastically: the keys are two hashes in Python per tensor and step, a quarter of the C++
    path's host time per tensor.
    """
    if step < 1:
        # Step 0 would divide by zero in the bias corrections (1 - beta**0).
        raise ValueError(f"step must be >= 1 (this step's number, already incremented: 1 at the first), got {step}")
    # Plain numbers for the cache key: a tensor lr (hashed by identity) could change in place.
    s = _shared_scalars(
        int(step), int(window), float(beta1), float(beta2), float(lr), float(weight_decay), float(release)
    )
    if not keys:
        return s
    return StepScalars(
        s.slots,
        s.w1,
        s.w2,
        s.write_slot,
        s.c1,
        s.c2,
        s.decay,
        s.keep,
        stream_key(seed, param_index, step, STREAM_ERROR),
        stream_key(seed, param_index, step, STREAM_PARAM),
    )


@functools.lru_cache(maxsize=64)
def _shared_scalars(
    step: int, window: int, beta1: float, beta2: float, lr: float, weight_decay: float, release: float
) -> StepScalars:
    # What every tensor of a param group shares in a step, computed once per step rather than once
    # per tensor (the per-tensor Python cost of a step matters for models of many small tensors).
    slots = _slot_ages(step, window)
    return StepScalars(
        slots=tuple(s for s, _ in slots),
        w1=tuple(beta1**age for _, age in slots),
        w2=tuple(beta2**age for _, age in slots),
        write_slot=(step - 1) % window,
        c1=(1 - beta1) / (1 - beta1**step),
        c2=(1 - beta2) / (1 - beta2**step),
        decay=1 - lr * weight_decay,
        keep=1 - release,
        err_key=0,
        par_key=0,
    )


# dtype of each state tensor; their shapes come from the layout (state_shapes).
STATE_DTYPES = {
    "window_indices": torch.int16,
    "window_values": torch.bfloat16,
    "error_codes": torch.uint8,
    "error_bounds": torch.bfloat16,
}


def state_shapes(layout: Layout) -> dict[str, tuple[int, ...]]:
    """The shape of each state tensor of a tensor with ``layout``."""
    m, nb, k = layout.window, layout.num_blocks, layout.k
    return {
        "window_indices": (m, nb, k),
        "window_values": (m, nb, k),
        "error_codes": ((layout.numel + 1) // 2,),
        "error_bounds": (layout.num_quant_blocks, 2),
    }


def zero_state(layout: Layout, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The state of a tensor before its first step: every entry zero (adds nothing to the moments)."""
    return {
        name: torch.zeros(shape, dtype=STATE_DTYPES[name], device=device)
        for name, shape in state_shapes(layout).items()
    }


def check_state(layout: Layout, **state: torch.Tensor) -> None:
    """Raise ``ValueError`` unless each state tensor has its dtype and ``layout``'s shape.

    Every path checks before it writes: the C++ and Triton kernels index raw pointers (a wrong shape
    writes out of bounds), and the torch path would read a ring of another window as this one's."""
    shapes = state_shapes(layout)
    for name, t in state.items():
        dtype, shape = STATE_DTYPES[name], shapes[name]
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
            got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"{name} must be {dtype} of shape {shape} for this layout (window={layout.window}, "
                f"{layout.num_blocks} blocks of k={layout.k}, quantization blocks of {layout.quant_block}), got "
                f"{got}: the state was built for another layout. Change window or density with "
                "MicroAdam.reconfigure(), not by editing param_groups (block_size and quant_block_size cannot change "
                "during training), and load checkpoints into an optimizer built with the same settings"
            )


def _add_at(out: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """``out[index] += values``, repeated indices summed in a fixed order on every device.

    A position held in several window slots repeats in ``index``. On CPU a 1-D ``scatter_add_``
    adds in index order, which is age order here (what the reference and the C++ path do). On CUDA
    it adds with atomics, in an order that changes from run to run: DDP replicas would drift apart
    by ulps, and reruns would not repeat. ``index_put_(accumulate=True)`` is CUDA's deterministic
    sum (a stable sort, then each position's terms in order; torch's own deterministic mode routes
    1-D ``scatter_add_`` to it), at the price of that sort."""
    if out.device.type == "cpu":
        out.scatter_add_(0, index, values)
    else:
        out.index_put_((index,), values, accumulate=True)


def check_hyperparameters(
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    error_rounding: str,
    release: float = 0.0,
    release_scale: float = 1.0,
) -> None:
    """Raise ``ValueError`` naming the argument for a value no step can take: a NaN or infinite lr, eps,
    weight decay or release scale would turn the parameter NaN, a beta of 1 divides by zero.

    What ``MicroAdam`` checks of its param groups at every step, for the functional API's callers;
    every implementation runs it first, so they refuse the same arguments.
    """
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay), ("release_scale", release_scale)):
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"Invalid {name}: {value!r}; it must be a number") from None
        if not math.isfinite(x) or (name == "release_scale" and x < 0):
            bound = "a finite number >= 0" if name == "release_scale" else "a finite number"
            raise ValueError(f"Invalid {name}: {value!r}; it must be {bound}")
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        try:
            ok = 0.0 <= float(value) < 1.0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"Invalid {name}: {value!r}; it must be in [0, 1), e.g. beta1=0.9, beta2=0.999")
    try:
        ok = 0.0 <= float(release) <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"Invalid release: {release!r}; it must be in [0, 1] (0 is the paper's algorithm)")
    if error_rounding not in ("nearest", "stochastic"):
        raise ValueError(f"Invalid error_rounding: {error_rounding!r}; use 'nearest' or 'stochastic'")


def step_in_place(
    param: torch.Tensor,
    grad: torch.Tensor,
    *,
    window_indices: torch.Tensor,
    window_values: torch.Tensor,
    error_codes: torch.Tensor,
    error_bounds: torch.Tensor,
    layout: Layout,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    error_rounding: str,
    stochastic_param_rounding: bool,
    seed: int,
    param_index: int,
    chunk_size: int = DEFAULT_CHUNK,
    impl: str = "torch",
    position_offset: int = 0,
    release: float = 0.0,
    release_scale: float = 1.0,
) -> None:
    """One MicroAdam step on ``param`` (any shape) with gradient ``grad``, in place.

    Args:
        param, grad: the parameter and its dense gradient (same number of elements).
        window_indices: ``int16 [window, blocks, k]`` block-relative indices.
        window_values: ``bfloat16 [window, blocks, k]`` signed values.
        error_codes: ``uint8 [ceil(numel / 2)]`` packed 4-bit error codes.
        error_bounds: ``bfloat16 [quant_blocks, 2]`` (lo, hi) per quantization block.
        layout: the tensor's :class:`~microadam.layout.Layout`.
        step: this step's number t, starting at 1 (already incremented).
        error_rounding: ``"nearest"`` or ``"stochastic"`` for the error codes.
        stochastic_param_rounding: round a bf16 parameter stochastically.
        seed, param_index: identify the random stream of this tensor.
        chunk_size: target elements per chunk (bounds transient memory).
        impl: ``"torch"`` (this function's own vectorized path) or the name of a fast
            implementation in :mod:`microadam.kernels`, which is called with the same arguments.
        position_offset: flat index of ``param``'s first element in the full tensor when it is a
            shard (FSDP2), so random bits are keyed by global positions.
        release: fraction of the residual error (what Top-K left) released each step as a dense
            move; 0, this function's default, is the paper's algorithm. ``MicroAdam``'s default
            ``variant="release"`` passes ``release=0.5, release_scale=1.0``: pass them to match it.
        release_scale: RMS of the dense move per quantization block, in units of ``lr``.

    Raises ``ValueError`` for a hyperparameter no step can take (:func:`check_hyperparameters`) and
    for a state of the wrong shape or dtype, before anything is written. It does not check the
    gradient: a NaN or Inf in ``grad`` enters the state. ``MicroAdam.step`` checks every gradient first
    (and skips or raises); a caller of this function checks its own
    (``microadam.optimizer.grads_in_range([grad])``).
    """
    check_hyperparameters(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        error_rounding=error_rounding,
        release=release,
        release_scale=release_scale,
    )
    if impl != "torch":
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"Invalid impl: {impl!r}; choose one of {IMPLEMENTATIONS}")
        extra = dict(release=release, release_scale=release_scale) if release else {}
        from microadam.kernels import load

        load(impl)(
            param,
            grad,
            window_indices=window_indices,
            window_values=window_values,
            error_codes=error_codes,
            error_bounds=error_bounds,
            layout=layout,
            step=step,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            error_rounding=error_rounding,
            stochastic_param_rounding=stochastic_param_rounding,
            seed=seed,
            param_index=param_index,
            chunk_size=chunk_size,
            position_offset=position_offset,
            **extra,
        )
        return
    n = layout.numel
    if param.numel() != n or grad.numel() != n:
        # Slicing by layout.numel would otherwise step only a parameter's first elements and skip the rest
        # silently (the C++ and Triton paths refuse this too).
        raise ValueError(
            f"param ({param.numel()} elements) and grad ({grad.numel()}) must both have layout.numel = {n} elements"
        )
    check_state(
        layout,
        window_indices=window_indices,
        window_values=window_values,
        error_codes=error_codes,
        error_bounds=error_bounds,
    )
    if n == 0:
        return
    states = (window_indices, window_values, error_codes, error_bounds)
    # The steps below flatten the state with views. A non-contiguous state (only the functional API can
    # hand one in: MicroAdam's are its own) is stepped in contiguous copies and copied back at the end,
    # as the C++ path does; the Triton path refuses it.
    window_indices, window_values, error_codes, error_bounds = (t.contiguous() for t in states)
    cd = compute_dtype(param.dtype)
    device = param.device
    contiguous = param.is_contiguous()
    p_flat = param.view(-1) if contiguous else param.contiguous().view(-1)
    g_flat = grad.reshape(-1)

    B, k, q, m = layout.block, layout.k, layout.quant_block, layout.window
    chunk = chunk_elements(layout, chunk_size)
    sc = step_scalars(
        step=step,
        window=m,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        param_index=param_index,
        release=release,
    )
    slot_idx = torch.tensor(sc.slots, device=device)
    w1 = torch.tensor(sc.w1, dtype=cd, device=device)
    w2 = torch.tensor(sc.w2, dtype=cd, device=device)
    write_slot, c1, c2, decay, err_key, par_key = sc.write_slot, sc.c1, sc.c2, sc.decay, sc.err_key, sc.par_key
    stochastic_param = stochastic_param_rounding and param.dtype == torch.bfloat16

    # Moment accumulators, zeroed once and restored to zero after each chunk by
    # writing zeros at the touched positions only (m*k per block, not B).
    scratch_m = torch.zeros(chunk, dtype=cd, device=device)
    scratch_s = torch.zeros(chunk, dtype=cd, device=device)

    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        length = end - start
        b0, b1 = start // B, -(-end // B)
        q0, q1 = start // q, -(-end // q)
        nbc, nqc = b1 - b0, q1 - q0

        # 1. a = g + dequant(e)
        codes = unpack_nibbles(error_codes[start // 2 : (end + 1) // 2], length)
        bounds = error_bounds[q0:q1]
        err = dequantize_blocks(_pad_rows(codes, nqc, q, 0), bounds[:, 0], bounds[:, 1], cd)
        a = g_flat[start:end].to(cd) + err.view(-1)[:length]

        # 2. exact block Top-K of |a|; padding (-1) is taken only after every real entry.
        a_blocks = _pad_rows(a, nbc, B, 0.0)
        mag = a_blocks.abs()
        if nbc * B != length:
            mag.view(-1)[length:] = -1.0
        idx = block_topk(mag, k)
        vals = a_blocks.gather(1, idx)
        # 3. zero the selected entries; what remains is the new error.
        a_blocks.scatter_(1, idx, 0.0)
        # Selections that fell on padding (a last block shorter than k) are
        # stored as index 0, value 0: they add nothing to the moments.
        if nbc * B != length:
            padded = (idx + (torch.arange(nbc, device=device) * B)[:, None]) >= length
            idx = idx.masked_fill(padded, 0)
            vals = vals.masked_fill(padded, 0.0)
        window_indices[write_slot, b0:b1] = idx.to(torch.int16)
        window_values[write_slot, b0:b1] = vals.to(torch.bfloat16)

        # 4. release part of the residual as a dense move, re-quantize the rest per quantization block.
        rest = a_blocks.view(-1)[:length]
        move = None
        if release:
            count = torch.full((nqc,), float(q), dtype=cd, device=device)
            count[-1] = length - (nqc - 1) * q
            move = release_move(_pad_rows(rest, nqc, q, 0.0), count, release_scale).view(-1)[:length]
            # keep == 0 stores exact zeros (rest * 0 would give -0 for negative entries).
            rest = rest * sc.keep if sc.keep else torch.zeros_like(rest)
        uniform = None
        if error_rounding == "stochastic":
            pos = torch.arange(start, start + nqc * q, device=device) + position_offset
            uniform = (hash_bits(pos, err_key) >> 8).to(cd).view(nqc, q) * 2.0**-24
        new_codes, lo, hi = quantize_blocks(_pad_rows(rest, nqc, q, None), uniform)
        error_codes[start // 2 : (end + 1) // 2] = pack_nibbles(new_codes.view(-1)[:length])
        error_bounds[q0:q1, 0] = lo
        error_bounds[q0:q1, 1] = hi

        # 5. moments from the window at the touched positions.
        win_idx = window_indices[slot_idx, b0:b1].to(torch.int64)
        win_val = window_values[slot_idx, b0:b1].to(cd)
        pos = (win_idx + (torch.arange(nbc, device=device) * B)[None, :, None]).view(-1)
        sm, ss = scratch_m[: nbc * B], scratch_s[: nbc * B]
        _add_at(sm, pos, (win_val * w1[:, None, None]).view(-1))
        _add_at(ss, pos, (win_val * win_val * w2[:, None, None]).view(-1))
        den = (c2 * ss[pos]).sqrt() + eps
        # den == 0 only with eps == 0 at a position whose entries are all zero: no move, not 0/0.
        u = torch.where(den > 0, c1 * sm[pos] / den, 0.0)
        sm[pos] = 0
        ss[pos] = 0

        # 6. p = p * (1 - lr * wd) - lr * u, u nonzero only at the window's positions.
        p_chunk = p_flat[start:end]
        if (weight_decay != 0 and param.dtype != cd) or move is not None:
            full = p_chunk.to(cd) * decay if weight_decay != 0 else p_chunk.to(cd)
            if move is not None:
                # Zero at the Top-K positions (their residual is 0): those move by u only.
                full = full - lr * move
            full[pos] = full[pos] - lr * u
            bits = (
                hash_bits(torch.arange(start, end, device=device) + position_offset, par_key)
                if stochastic_param
                else None
            )
            p_chunk.copy_(round_to_dtype(full, param.dtype, bits))
        else:
            if weight_decay != 0:
                p_chunk.mul_(decay)
            # fp32/fp64 decayed in place above; a low-precision parameter here has wd == 0.
            new = p_chunk[pos].to(cd) - lr * u
            bits = hash_bits(pos + (start + position_offset), par_key) if stochastic_param else None
            # Duplicated positions carry equal values (same u, same random bits).
            p_chunk[pos] = round_to_dtype(new, param.dtype, bits)

    if not contiguous:
        param.copy_(p_flat.view(param.shape))
    for t, work in zip(states, (window_indices, window_values, error_codes, error_bounds)):
        if work is not t:
            t.copy_(work)


def check_seed(seed: object) -> None:
    """Raise, naming it, unless ``seed`` is an int in [0, 2**32), the range of the random streams' 32-bit
    words. Shared by ``MicroAdam``'s param groups and the functional step. A plain int only: a bool
    is no seed, and a NumPy integer in a param group would not load with ``weights_only=True``."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"Invalid seed: {seed!r} ({type(seed).__name__}); it must be an int in [0, 2**32)")
    if not 0 <= seed < 2**32:
        # A larger seed would hash to a smaller one's bits: another seed's stream.
        raise ValueError(f"Invalid seed: {seed}; it must be in [0, 2**32) (e.g. seed % 2**32)")


def _check_counters(step: object, seed: object) -> None:
    """The functional API's ``step`` and ``seed``, which ``MicroAdam`` keeps itself: an int ``step`` >= 1
    (torch.optim's own states keep a float tensor step, which failed deep in the hashing with an
    unnamed error) and a ``seed`` in [0, 2**32) (``check_seed``; here any integer type). A wrong type
    raises TypeError, a value out of range ValueError, as torch's own checks do."""
    try:
        if isinstance(step, bool):  # an int to Python, but no step number
            raise TypeError
        t = operator.index(step)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"Invalid step: {step!r}; it must be an int >= 1, this step's number (1 at the first), e.g. int(step)"
        ) from None
    if t < 1:
        raise ValueError(
            f"Invalid step: {t}; it must be >= 1 (this step's number, already incremented: 1 at the first)"
        )
    # Any integer here, as the step (a NumPy or tensor one: this call keeps nothing); MicroAdam's groups,
    # which are saved, take a Python int only.
    with contextlib.suppress(TypeError):
        seed = seed if isinstance(seed, bool) else operator.index(seed)  # type: ignore[arg-type]
    check_seed(seed)


@functools.wraps(step_in_place)
def _public_step(param: torch.Tensor, grad: torch.Tensor, **kwargs: Any) -> None:
    if "step" in kwargs and "seed" in kwargs:  # else step_in_place names the missing argument
        _check_counters(kwargs["step"], kwargs["seed"])
    # MicroAdam.step runs under no_grad; a caller of this function may not. With grad enabled the torch
    # path wrote the state and then failed at the in-place update of a leaf parameter (a retry applied
    # the gradient twice), while the C++ path, which writes through pointers, stepped.
    with torch.no_grad():
        step_in_place(param, grad, **kwargs)


# The public step: checked, under no_grad, eager even inside a compiled function. MicroAdam.step, itself
# never compiled, calls step_in_place and does not pay the wrapper's cost per tensor.
microadam_step = never_compiled(_public_step)
