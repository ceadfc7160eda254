"""One table of optimizer configurations and one tolerance policy for the tests.

Each row of ``CONFIGS`` is a set of MicroAdam keyword arguments chosen to hit a
different corner of the algorithm with small blocks, so that 50 steps of the
slow reference stay fast. ``SHAPES`` are the edge cases every config is crossed
with.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from microadam import MicroAdam
from microadam.ops import unpack_nibbles
from microadam.optimizer import resolve_variant
from microadam.reference import ReferenceMicroAdam

# FSDP2 (public fully_shard, CPU/gloo) and the public torch.distributed.tensor come with torch 2.6; on an
# older torch those tests are skipped saying so (the single-process core runs on torch >= 2.4).
NEEDS_FSDP2 = pytest.mark.skipif(
    torch.torch_version.TorchVersion(torch.__version__) < (2, 6),
    reason=f"FSDP2 and DTensor on CPU need torch >= 2.6; this is torch {torch.__version__}",
)


@dataclasses.dataclass(frozen=True)
class Config:
    id: str
    kwargs: dict[str, Any]


BASE = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, window=4, density=0.05, block_size=64, quant_block_size=16)

CONFIGS = [
    Config("small-blocks", dict(BASE)),
    Config("weight-decay", dict(BASE, weight_decay=0.1)),
    Config("stochastic-error", dict(BASE, error_rounding="stochastic")),
    Config("dense-density-1", dict(BASE, density=1.0, window=2)),
    Config("window-1", dict(BASE, window=1)),
    Config("quant-block-larger", dict(BASE, block_size=32, quant_block_size=64, weight_decay=0.01)),
    Config("odd-blocks", dict(BASE, block_size=15, quant_block_size=5, density=0.2)),
    Config("many-chunks", dict(BASE, chunk_size=128, weight_decay=0.05)),
    # Chunks of odd blocks (lcm(15, 5, 2) = 30: the 2 keeps packed bytes inside a chunk) and of
    # quantization blocks larger than Top-K blocks.
    Config("odd-blocks-chunked", dict(BASE, block_size=15, quant_block_size=5, density=0.2, chunk_size=45)),
    Config("quant-block-larger-chunked", dict(BASE, block_size=32, quant_block_size=64, chunk_size=128)),
    Config("paper-defaults", dict(lr=1e-3, window=10, density=0.01, block_size=4096, quant_block_size=128)),
    # Released error feedback: all of it (the error feedback stays empty), and part of it with
    # weight decay over chunks of odd blocks (the dense move's blocks of q cross Top-K blocks).
    Config("release-all", dict(BASE, release=1.0)),
    Config(
        "release-half-odd-chunked",
        dict(
            BASE,
            block_size=15,
            quant_block_size=5,
            density=0.2,
            chunk_size=45,
            release=0.5,
            release_scale=0.7,
            weight_decay=0.05,
        ),
    ),
]

# Shapes: empty, one element, tiny, just over a 64-block, not a multiple of
# either block size, 2-D; "T" marks a transposed (non-contiguous) parameter.
SHAPES: list[tuple[tuple[int, ...], bool]] = [
    ((0,), False),
    ((1,), False),
    ((7,), False),
    ((65,), False),
    ((203,), False),
    ((37, 29), False),
    ((29, 37), True),
]
# The paper-defaults row needs tensors over a 4096-block to say anything.
BIG_SHAPES: list[tuple[tuple[int, ...], bool]] = [((1,), False), ((8197,), False), ((97, 130), True)]

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def shapes_for(config: Config) -> list[tuple[tuple[int, ...], bool]]:
    return BIG_SHAPES if config.kwargs.get("block_size", 4096) >= 4096 else SHAPES


def make_param(shape: tuple[int, ...], transposed: bool, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if transposed:
        base = torch.randn(shape[::-1], generator=gen, dtype=torch.float64).to(dtype)
        t = base.t()
        assert not t.is_contiguous() or t.numel() <= 1
        return t
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------- tolerance policy
# Why these numbers: the fast path and the reference do the same operations in
# the same order on the state (which therefore matches bit for bit), but the
# moment sums can be grouped differently (scatter_add vs a Python loop), so
# a parameter can differ by an ulp of the compute dtype per step. float64 leaves
# that far below 1e-12 after 50 steps; float32 a few ulps; bf16/fp16 parameters
# round the result, so an ulp of float32 shows up, rarely, as one ulp of the
# parameter's own dtype.
TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-5),
    torch.float16: dict(rtol=2**-10, atol=1e-5),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Compare under the project's tolerance for ``dtype`` (default: ``expected``'s)."""
    tol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual.double(), expected.double(), **tol)


# ---------------------------------------------------------------- helpers


def reference_for(params: list[torch.Tensor], kwargs: dict[str, Any], dtype: torch.dtype, **extra: Any):
    ref_kwargs = {k: v for k, v in kwargs.items() if k not in ("chunk_size", "nonfinite", "impl")}
    sr = ref_kwargs.pop("stochastic_rounding", True)
    # The optimizer's variant names a (release, release_scale) pair; the reference takes the pair.
    release, scale = resolve_variant(
        ref_kwargs.pop("variant", "release"), ref_kwargs.pop("release", None), ref_kwargs.pop("release_scale", None)
    )
    ref_kwargs.update(release=release, release_scale=scale)
    return ReferenceMicroAdam(
        params,
        **ref_kwargs,
        stochastic_param_rounding=sr,
        compute_dtype=torch.float64 if dtype == torch.float64 else torch.float32,
        **extra,
    )


def assert_state_matches_reference(opt: MicroAdam, p: torch.Tensor, ref: ReferenceMicroAdam, i: int) -> None:
    """Every stored quantity of ``p`` equals the reference's, bit for bit."""
    st, rst = opt.state[p], ref.states[i]
    assert st["step"] == rst.step
    if p.numel() == 0:
        return
    codes = unpack_nibbles(st["error_codes"], p.numel()).long()
    assert torch.equal(codes, rst.codes), "error codes differ"
    cd = rst.lo.dtype
    assert torch.equal(st["error_bounds"][:, 0].to(cd), rst.lo), "lo differs"
    assert torch.equal(st["error_bounds"][:, 1].to(cd), rst.hi), "hi differs"
    m = opt.param_groups[0]["window"]
    for slot in range(min(rst.step, m)):
        idx, val = rst.window[slot]
        assert torch.equal(st["window_indices"][slot].long(), idx), f"window indices differ in slot {slot}"
        assert torch.equal(st["window_values"][slot].to(cd), val), f"window values differ in slot {slot}"


def ids(configs: list[Config]) -> list[Any]:
    return [pytest.param(c, id=c.id) for c in configs]


# Gradients at GRAD_LIMIT, the largest magnitude a step takes, in the patterns that stress the sums
# that could overflow: one sign every step (what the error feedback leaves behind accumulates), random
# signs and magnitudes (a quantization block's range hi - lo is twice the limit), and a sign that
# flips every step (the window's weighted sums cancel).
LIMIT_PATTERNS = ("same", "mixed", "alternating")


def step_at_the_grad_limit(
    impl: str, dtype: torch.dtype, pattern: str, variant: str, steps: int = 40, device: str = "cpu"
) -> None:
    """Runs ``steps`` steps of ``MicroAdam(impl=impl, variant=variant)`` on a 300-element parameter with
    gradients of magnitude up to GRAD_LIMIT in ``pattern``, and checks that the state and the parameter
    stay finite and no step was skipped; then that a gradient of 3e38 (within float32, beyond the
    limit, which put NaN into the state before the limit) is skipped with the state and the parameter
    unchanged. ``"paper"`` keeps all of the error feedback (``"release"`` halves it every step), so
    the one-sign pattern accumulates."""
    from microadam.optimizer import GRAD_LIMIT

    gen = torch.Generator().manual_seed(5)
    p = torch.nn.Parameter(torch.randn(300, generator=gen).to(device, dtype))
    kw = dict(lr=1e-2, window=4, density=0.05, block_size=64, quant_block_size=16)
    opt = MicroAdam([p], **kw, impl=impl, variant=variant)

    def floats() -> list[torch.Tensor]:
        return [p.detach().clone()] + [
            v.clone() for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.is_floating_point()
        ]

    for step in range(steps):
        if pattern == "same":
            g = torch.full((300,), GRAD_LIMIT)
        elif pattern == "mixed":
            g = (torch.rand(300, generator=gen) * 2 - 1) * GRAD_LIMIT
            g[step % 300] = -GRAD_LIMIT if step % 2 else GRAD_LIMIT
        else:
            g = torch.full((300,), GRAD_LIMIT * (-1) ** step)
        p.grad = g.to(device, dtype)
        opt.step()
        bad = [i for i, t in enumerate(floats()) if not torch.isfinite(t.float()).all()]
        assert not bad, f"{impl} {dtype} {pattern}: step {step} left NaN or Inf in {bad} (0 is the parameter)"
    assert opt.skipped_steps == 0
    before = floats()
    p.grad = torch.zeros(300, dtype=dtype, device=device)
    p.grad[7] = 3e38
    with pytest.warns(RuntimeWarning, match=r"parameter 0 \(shape \(300,\)\) holds \S+e\+38, beyond GRAD_LIMIT"):
        opt.step()
    assert opt.skipped_steps == 1 and opt.state[p]["step"] == steps
    assert all(torch.equal(a, b) for a, b in zip(before, floats()))


def trained_linear_8x8(block_size: int, seed: int, shard: Any = None) -> tuple[torch.nn.Module, MicroAdam]:
    """An 8x8 linear layer trained 3 steps: its 64 elements make two Top-K blocks (k=1) under block_size
    48 or 32, so two such states have the same shapes and only the settings tell them apart (for the
    checkpoint-refusal tests). ``shard`` (e.g. ``fully_shard``) is applied to the model first."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8, bias=False)
    if shard is not None:
        shard(model)
    opt = MicroAdam(model.parameters(), lr=1e-2, density=0.02, block_size=block_size, quant_block_size=16, window=2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 8, generator=gen)).square().mean().backward()
        opt.step()
    return model, opt
