"""The Triton kernels (``impl="triton"``) against the vectorized torch path and the reference.

Without a GPU the kernels run on CPU tensors in Triton's interpreter, which Triton selects when a
kernel is decorated: TRITON_INTERPRET must be set before ``microadam.kernels.triton_kernels`` is
imported, hence at the top of this module (a CUDA machine may set TRITON_INTERPRET=0 to test the
compiled kernels on the GPU instead). The interpreter runs a kernel program in tens of
milliseconds, so the tensors are small and the steps few, but every config runs past its window
length so that the ring wraps.

What must match: the state (window indices and values, error codes and bounds) bit for bit, at
every step, and the parameters within ``TOLERANCES``. They are not bit-equal in float32 because
the kernel's square root is correctly rounded (``sqrt_rn``) while torch's CPU ``sqrt`` is not (on
an AVX512 build, 20% of float32 inputs come out one ulp off); so the torch path is also run with a
correctly rounded ``Tensor.sqrt`` patched in, and against that run the parameters must be
bit-equal too: every other operation is the same, in the same order.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
import zlib  # noqa: E402
from typing import Any  # noqa: E402
from unittest import mock  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from microadam import MicroAdam  # noqa: E402
from microadam.functional import microadam_step  # noqa: E402
from microadam.kernels import availability  # noqa: E402
from microadam.kernels import triton_kernels as tk  # noqa: E402
from microadam.layout import layout_for  # noqa: E402
from microadam.ops import unpack_nibbles  # noqa: E402
from tests.common import (  # noqa: E402
    LIMIT_PATTERNS,
    assert_close,
    assert_state_matches_reference,
    reference_for,
    step_at_the_grad_limit,
)

DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] not in ("", "0") else "cuda"


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    shapes: tuple[tuple[int, ...], ...]
    block_size: int = 64
    density: float = 0.05
    quant_block_size: int = 16
    window: int = 4
    dtype: torch.dtype = torch.float32
    grad_dtype: torch.dtype | None = None  # None: the parameter's dtype
    weight_decay: float = 0.0
    error_rounding: str = "nearest"
    stochastic_param_rounding: bool = True
    eps: float = 1e-8
    steps: int = 6
    position_offset: int = 0
    zero_fraction: float = 0.0  # gradients with exact zeros: ties at zero, den == 0 with eps == 0
    transposed: bool = False  # non-contiguous parameters (2-D shapes only)
    release: float = 0.0  # released error feedback (MicroAdam's default variant: 0.5)
    release_scale: float = 1.0
    signed_zeros: bool = False  # gradients of +0, -0 and -2**-149 (halved to -0 by release), a few normal


# Shapes: one element, tiny (one block), just over a 64-block (a last block shorter than k, whose
# padding selections are stored as index 0, value 0), not a multiple of either block size. The
# cases cross the tile modes of the compress kernel: Top-K blocks as rows or as one or two segments
# of rows, the same for quantization blocks, odd rows whose packed bytes straddle two rows.
SMALL = ((1,), (7,), (65,), (139,))
CASES = [
    Case("small-blocks", SMALL),
    Case("bf16", SMALL, dtype=torch.bfloat16),
    Case("fp16-weight-decay", ((7,), (139,)), dtype=torch.float16, weight_decay=0.1),
    Case("weight-decay", ((7,), (139,)), weight_decay=0.1),
    Case("bf16-wd-stochastic", SMALL, dtype=torch.bfloat16, weight_decay=0.1, error_rounding="stochastic"),
    Case(
        "bf16-nearest-param", ((65,), (139,)), dtype=torch.bfloat16, weight_decay=0.1, stochastic_param_rounding=False
    ),
    Case("stochastic-error-sharded", ((139,),), error_rounding="stochastic", position_offset=1000),
    Case("dense-density-1", ((7,), (65,)), density=1.0, window=2, steps=4),
    Case("window-1", ((65,), (139,)), window=1, steps=3),
    Case("quant-block-larger", ((7,), (139,)), block_size=32, quant_block_size=64, weight_decay=0.01),
    Case("odd-blocks", ((7,), (92,)), block_size=15, quant_block_size=5, density=0.2, window=3, steps=5),
    Case("odd-quant-larger", ((61,),), block_size=5, quant_block_size=15, density=0.4, window=2, steps=4),
    Case("odd-quant-rows", ((50,),), block_size=64, quant_block_size=7, density=0.1, window=2, steps=4),
    Case("bf16-grads", ((65,), (139,)), grad_dtype=torch.bfloat16, window=3, steps=5),
    Case("release-signed-zeros", ((65,), (139,)), release=0.5, signed_zeros=True, window=3, steps=4),
    Case("fp64-grads-fp16", ((65,),), dtype=torch.float16, grad_dtype=torch.float64, window=2, steps=4),
    Case("zero-ties-eps0", ((65,), (139,)), zero_fraction=0.97, eps=0.0, window=3, steps=5),
    Case("transposed", ((5, 9), (13, 3)), transposed=True, window=2, steps=4),
    Case("paper-defaults", ((8197,),), block_size=4096, density=0.01, quant_block_size=128, window=3, steps=5),
    # Released error feedback: the defaults, rows of every tile mode it supports (quantization
    # blocks as rows, padded to a power of two: 16 of 64, 5 of 15, 7 of one block; a tensor
    # smaller than its quantization block), all released with weight decay, blocks whose residual
    # is all zero (rms 0: no move), and low-precision parameters.
    Case(
        "release-defaults",
        ((8197,),),
        block_size=4096,
        density=0.01,
        quant_block_size=128,
        window=3,
        steps=5,
        release=0.5,
    ),
    # k = 103 > 64: the update kernel compares another slot's entries in two chunks of 64 (CH).
    Case("many-entries-chunked", ((1500,),), block_size=1024, density=0.1, quant_block_size=128, window=3, steps=4),
    Case("release-small", SMALL, release=0.5),
    Case("release-all-wd", ((7,), (139,)), release=1.0, release_scale=0.7, weight_decay=0.1),
    Case(
        "release-odd-blocks",
        ((7,), (92,)),
        block_size=15,
        quant_block_size=5,
        density=0.2,
        window=3,
        steps=5,
        release=0.5,
        error_rounding="stochastic",
    ),
    Case(
        "release-odd-quant-rows",
        ((50,),),
        block_size=64,
        quant_block_size=7,
        density=0.1,
        window=2,
        steps=4,
        release=0.25,
        release_scale=2.0,
    ),
    Case("release-zero-ties-eps0", ((65,), (139,)), zero_fraction=0.97, eps=0.0, window=3, steps=5, release=0.5),
    Case(
        "release-bf16-wd-stochastic",
        SMALL,
        dtype=torch.bfloat16,
        weight_decay=0.1,
        error_rounding="stochastic",
        release=0.5,
    ),
    Case("release-fp16", ((65,), (139,)), dtype=torch.float16, release=0.5, window=3, steps=5),
    # Quantization blocks of several rows (powers of two): 4 rows of 16, a partial last block (139 =
    # 2 * 64 + 11), a tensor of one partial block (7), 2 rows of 2 (the narrowest tile), bf16.
    Case(
        "release-quant-larger",
        ((7,), (139,)),
        block_size=16,
        quant_block_size=64,
        density=0.2,
        window=3,
        steps=5,
        release=0.5,
        weight_decay=0.1,
    ),
    Case(
        "release-quant-larger-narrow",
        ((33,),),
        block_size=2,
        quant_block_size=4,
        density=0.5,
        window=2,
        steps=4,
        release=0.25,
        release_scale=2.0,
    ),
    Case(
        "release-quant-larger-bf16",
        ((139,),),
        dtype=torch.bfloat16,
        block_size=32,
        quant_block_size=128,
        density=0.1,
        window=3,
        steps=5,
        release=0.5,
        error_rounding="stochastic",
    ),
]


def _zero_state(lay: Any) -> dict[str, torch.Tensor]:
    """The state MicroAdam._init_state creates."""
    return dict(
        window_indices=torch.zeros((lay.window, lay.num_blocks, lay.k), dtype=torch.int16, device=DEVICE),
        window_values=torch.zeros((lay.window, lay.num_blocks, lay.k), dtype=torch.bfloat16, device=DEVICE),
        error_codes=torch.zeros((lay.numel + 1) // 2, dtype=torch.uint8, device=DEVICE),
        error_bounds=torch.zeros((lay.num_quant_blocks, 2), dtype=torch.bfloat16, device=DEVICE),
    )


def _make(shape: tuple[int, ...], case: Case, gen: torch.Generator) -> torch.Tensor:
    if case.transposed:
        return torch.randn(shape[::-1], generator=gen, dtype=torch.float64).to(case.dtype).to(DEVICE).t()
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(case.dtype).to(DEVICE)


def _grad(shape: tuple[int, ...], case: Case, gen: torch.Generator) -> torch.Tensor:
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    if case.zero_fraction:
        g = g * (torch.rand(shape, generator=gen, dtype=torch.float64) >= case.zero_fraction)
    if case.signed_zeros:
        # Which zero a block's min or max is depends on the order of comparisons unless every path
        # makes it +0 (ops.quant._plus_zero).
        r = torch.rand(shape, generator=gen, dtype=torch.float64)
        tiny = torch.full_like(g, -(2.0**-149))
        g = torch.where(r < 0.05, g, torch.where(r < 0.5, tiny, torch.where(r < 0.75, -0.0, 0.0)))
    return g.to(case.grad_dtype or case.dtype).to(DEVICE)


def _assert_states_equal(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor], numel: int, where: str):
    for name in ("window_indices", "error_bounds", "window_values"):
        e, a = expected[name], actual[name]
        if e.dtype == torch.bfloat16:  # compare bit patterns: -0.0 and 0.0 differ
            e, a = e.view(torch.int16), a.view(torch.int16)
        assert torch.equal(a, e), f"{name} differs at {where}: {(a != e).nonzero()[:5].tolist()}"
    codes_e = unpack_nibbles(expected["error_codes"], numel)
    codes_a = unpack_nibbles(actual["error_codes"], numel)
    assert torch.equal(codes_a, codes_e), (
        f"error codes differ at {where}: {(codes_a != codes_e).nonzero()[:5].tolist()}"
    )
    assert torch.equal(actual["error_codes"], expected["error_codes"]), f"padding nibble differs at {where}"


_torch_sqrt = torch.Tensor.sqrt


def _correctly_rounded_sqrt(x: torch.Tensor) -> torch.Tensor:
    # float64 has more than twice float32's precision, so rounding its (correctly rounded) square
    # root to float32 rounds correctly.
    return _torch_sqrt(x.double()).to(x.dtype) if x.dtype == torch.float32 else _torch_sqrt(x)


def _run_against_torch(case: Case, multi: bool) -> None:
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    params = [_make(s, case, gen) for s in case.shapes]
    ref_params = [p.clone() for p in params]
    # scatter_add on CUDA sums in no fixed order: bit-equality is a CPU-only claim.
    exact = [p.clone() for p in params] if DEVICE == "cpu" else None
    layouts = [
        layout_for(
            p.numel(),
            block_size=case.block_size,
            density=case.density,
            quant_block_size=case.quant_block_size,
            window=case.window,
        )
        for p in params
    ]
    states = [_zero_state(lay) for lay in layouts]
    ref_states = [_zero_state(lay) for lay in layouts]
    exact_states = [_zero_state(lay) for lay in layouts]
    before = [p.clone() for p in params]
    hyper = dict(
        lr=1e-2,
        beta1=0.9,
        beta2=0.999,
        eps=case.eps,
        weight_decay=case.weight_decay,
        error_rounding=case.error_rounding,
        stochastic_param_rounding=case.stochastic_param_rounding,
        seed=7,
        position_offset=case.position_offset,
    )
    if case.release:
        hyper.update(release=case.release, release_scale=case.release_scale)
    for step in range(1, case.steps + 1):
        grads = [_grad(p.shape, case, gen) for p in params]
        items = []
        for i, (p, r, g) in enumerate(zip(params, ref_params, grads)):
            kw = dict(layout=layouts[i], step=step, param_index=i, **hyper)
            microadam_step(r, g.clone(), **ref_states[i], **kw, impl="torch")
            if exact is not None:
                if case.release and case.dtype != torch.float32:
                    exact[i].copy_(p)  # see _assert_rounded_twice_at_window
                    before[i] = p.clone()
                with mock.patch.object(torch.Tensor, "sqrt", _correctly_rounded_sqrt):
                    microadam_step(exact[i], g.clone(), **exact_states[i], **kw, impl="torch")
            if multi:
                items.append(dict(param=p, grad=g.clone(), **states[i], **kw))
            else:
                microadam_step(p, g.clone(), **states[i], **kw, impl="triton")
        if multi:
            tk.microadam_step_triton_multi(items)
        for i, (p, r) in enumerate(zip(params, ref_params)):
            where = f"step {step}, shape {tuple(p.shape)}"
            _assert_states_equal(ref_states[i], states[i], p.numel(), where)
            assert p.dtype == case.dtype and p.shape == r.shape
            if case.release and case.dtype != torch.float32:
                # Rounded twice at the window's positions each step (checked exactly below), the
                # trajectories drift apart by units in the last place.
                eps = torch.finfo(case.dtype).eps
                torch.testing.assert_close(p.cpu().double(), r.cpu().double(), rtol=4 * eps, atol=1e-5)
            else:
                assert_close(p.cpu(), r.cpu(), case.dtype)
            if exact is not None and case.release and case.dtype != torch.float32:
                _assert_rounded_twice_at_window(p, exact[i], before[i], states[i], layouts[i], where)
            elif exact is not None:
                diff = (p.reshape(-1) != exact[i].reshape(-1)).nonzero().flatten()
                assert diff.numel() == 0, f"parameter bits differ at {where}, positions {diff[:5].tolist()}"


def _assert_rounded_twice_at_window(
    p: torch.Tensor, exact: torch.Tensor, before: torch.Tensor, state: dict[str, torch.Tensor], lay: Any, where: str
) -> None:
    """A low-precision parameter under release: bit-equal except where the kernels round twice.

    The compress kernel rounds ``p * decay - lr * move`` into the parameter's dtype and the update
    kernel rounds again after subtracting ``lr * u`` at the window's positions; the torch path
    rounds once. So positions outside this step's window must match bit for bit, and those in it
    may differ by the first rounding's error: at most one unit in the last place of the
    intermediate value, which is at most about the parameter before the step plus the dense move
    (below 0.05 here: lr 1e-2 times at most sqrt(16) * release_scale 2), plus the second rounding's
    unit. (The parameter carries last step's differences forward, so ``exact`` is the torch path on
    the kernel's own previous parameter ``before``.)
    """
    a = p.reshape(-1).view(torch.int16).int()
    e = exact.reshape(-1).view(torch.int16).int()
    in_window = torch.zeros(a.numel(), dtype=torch.bool)
    idx = state["window_indices"].long().cpu()
    vals = state["window_values"].float().cpu()
    blocks = torch.arange(lay.num_blocks)[None, :, None] * lay.block
    in_window[(idx + blocks)[vals != 0]] = True
    differ = a != e
    outside = (differ.cpu() & ~in_window).nonzero().flatten()
    assert outside.numel() == 0, f"parameter bits differ outside the window at {where}: {outside[:5].tolist()}"
    eps = torch.finfo(p.dtype).eps
    got, want, prev = (x.reshape(-1).double().cpu() for x in (p, exact, before))
    bound = 2 * eps * (prev.abs() + 0.05 + want.abs())
    worst = ((got - want).abs() - bound).max().item() if got.numel() else 0.0
    assert worst <= 0, f"parameter off the torch path's by more than two roundings at {where} (excess {worst})"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_kernels_match_torch_path(case: Case) -> None:
    """All of a case's tensors go through one multi-tensor call, as an optimizer step would."""
    _run_against_torch(case, multi=True)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES if c.id in ("odd-blocks", "bf16")])
def test_single_tensor_entry_point_through_functional(case: Case) -> None:
    """``microadam_step(impl="triton")`` goes through the registry to ``microadam_step_triton``."""
    _run_against_torch(dataclasses.replace(case, steps=case.window + 1), multi=False)


def _count_launches(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The grid of every kernel launch from now on, in order (the kernels still run)."""
    launches: list[Any] = []

    class Counting:
        def __init__(self, kernel: Any) -> None:
            self.kernel = kernel

        def __getitem__(self, grid: Any) -> Any:
            launches.append(grid)
            return self.kernel[grid]

    monkeypatch.setattr(tk, "_compress_kernel", Counting(tk._compress_kernel))
    monkeypatch.setattr(tk, "_update_kernel", Counting(tk._update_kernel))
    return launches


def test_tensors_of_one_tile_class_share_a_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small tensors of one tile class cost one launch of each kernel, not two per tensor."""
    launches = _count_launches(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    # Sizes 40..60 with block_size=64 are single blocks of one tile class (64 columns, k <= 2).
    sizes = [40, 45, 50, 55, 60, 63]
    items = []
    for i, n in enumerate(sizes):
        lay = layout_for(n, block_size=64, density=0.03, quant_block_size=64, window=2)
        p = torch.randn(n, generator=gen).to(DEVICE)
        items.append(
            dict(
                param=p,
                grad=torch.randn(n, generator=gen).to(DEVICE),
                **_zero_state(lay),
                layout=lay,
                step=1,
                lr=1e-2,
                beta1=0.9,
                beta2=0.999,
                eps=1e-8,
                weight_decay=0.0,
                error_rounding="nearest",
                stochastic_param_rounding=True,
                seed=0,
                param_index=i,
            )
        )
    expected = []
    for item in items:
        ref = {name: v.clone() if isinstance(v, torch.Tensor) else v for name, v in item.items()}
        microadam_step(ref["param"], ref.pop("grad"), **{k: v for k, v in ref.items() if k != "param"}, impl="torch")
        expected.append(ref)
    tk.microadam_step_triton_multi(items)
    assert len(launches) == 2, launches
    assert launches[0] == (len(sizes),) and launches[1] == (len(sizes),)
    # Each tensor's numbers came from its own row of the tables.
    for item, ref in zip(items, expected):
        _assert_states_equal(ref, item, item["param"].numel(), f"size {item['param'].numel()}")
        assert_close(item["param"], ref["param"])


# In CI's slow pass: the default suite took 626 s of its 600 on 2 cores (2026-12-01). 11 s.
@pytest.mark.slow
def test_cached_rows_follow_every_input_that_changes_between_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """_prepare builds a tensor's steady table row once and reuses it while its inputs stay the same.

    Step by step the inputs change the way training changes them: the learning rate (a scheduler),
    the gradient's dtype and contiguity, each state tensor replaced by a copy at a new address (a
    checkpoint load), the parameter replaced by a new tensor and by a transposed view (stepped in a
    contiguous copy), the release switched off, weight decay and stochastic rounding switched on,
    the seed, the tensor's index (both in its random streams' key) and its position offset changed,
    the parameter's bits viewed as float16 and back;
    the row cache holds 3 rows here, so it is also emptied when full. Each step starts the torch
    path (with a correctly rounded sqrt) from the kernels' parameter, so the state must match bit
    for bit and the parameter too, except where the release rounds it twice (see
    _assert_rounded_twice_at_window): a row built from stale inputs fails one of these. (The
    fingerprint's other inputs, the devices and the layout, cannot change alone: a layout comes with
    its own state tensors.)
    """
    if DEVICE != "cpu":
        pytest.skip("bit-equality with the torch path is a CPU claim (scatter_add order on CUDA)")
    monkeypatch.setattr(tk, "_MAX_STATICS", 3)
    tk._STATICS.clear()
    tk._BATCHES.clear()
    gen = torch.Generator().manual_seed(3)
    shape = (9, 14)
    lay = layout_for(126, block_size=32, density=0.1, quant_block_size=8, window=3)
    p = torch.randn(shape, generator=gen).to(torch.bfloat16).to(DEVICE)
    state, ref_state = _zero_state(lay), _zero_state(lay)
    hyper = dict(
        lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, error_rounding="nearest",
        stochastic_param_rounding=False, seed=5, param_index=2, release=0.5, release_scale=1.0, position_offset=0,
    )  # fmt: skip
    changes = [
        {},
        dict(lr=3e-3),
        dict(grad_dtype=torch.float32),
        dict(grad_t=True),
        *(dict(new_state=name) for name in state),
        dict(new_param=True),
        dict(param_t=True),
        dict(new_param=True),
        dict(release=0.0),
        dict(weight_decay=5.0),  # lr * weight_decay above a bf16 unit: visible
        dict(error_rounding="stochastic"),
        dict(stochastic_param_rounding=True),
        dict(seed=6),
        dict(param_index=3),
        dict(position_offset=1000),
        dict(view=torch.float16),  # the parameter's bits as another dtype, at the same address
        dict(view=torch.bfloat16),
    ]
    retired = []  # replaced tensors stay alive: a new tensor must not get the old one's address
    for step, change in enumerate(changes, start=1):
        hyper.update({k: v for k, v in change.items() if k in hyper})
        g = torch.randn(shape, generator=gen, dtype=change.get("grad_dtype", torch.bfloat16)).to(DEVICE)
        if change.get("grad_t"):
            g = g.t().contiguous().t()
            assert not g.is_contiguous()
        if "new_state" in change:
            retired.append(state[change["new_state"]])
            state = {name: t.clone() if name == change["new_state"] else t for name, t in state.items()}
        if change.get("new_param"):
            retired.append(p)
            p = p.contiguous().clone()
        if "view" in change:
            p = p.view(change["view"])
        if change.get("param_t"):
            p = p.t().contiguous().t()
            assert not p.is_contiguous()
        before, ref = p.clone(), p.clone()
        kw = dict(layout=lay, step=step, **hyper)
        with mock.patch.object(torch.Tensor, "sqrt", _correctly_rounded_sqrt):
            microadam_step(ref, g.clone(), **ref_state, **kw, impl="torch")
        tk.microadam_step_triton_multi([dict(param=p, grad=g, **state, **kw)])
        where = f"step {step} ({change})"
        _assert_states_equal(ref_state, state, lay.numel, where)
        if hyper["release"]:
            _assert_rounded_twice_at_window(p, ref, before, state, lay, where)
        else:
            diff = (p.reshape(-1).view(torch.int16) != ref.reshape(-1).view(torch.int16)).nonzero().flatten()
            assert diff.numel() == 0, f"parameter bits differ at {where}, positions {diff[:5].tolist()}"
        assert len(tk._STATICS) <= 3
        # The launches' cached tables (and their device maps) hold current rows only.
        live = {id(st) for st in tk._STATICS.values()}
        assert all(id(st) in live for batch in tk._BATCHES.values() for st in batch.statics)
    # The checks hold for a row served from the cache too, and a refused step writes nothing.
    kept = {name: t.clone() for name, t in state.items()}
    short = torch.randn(lay.numel - 1, generator=gen).to(torch.bfloat16).to(DEVICE)
    with pytest.raises(ValueError, match="layout.numel=126 but param has 126 and grad 125"):
        tk.microadam_step_triton_multi([dict(param=p, grad=short, **state, **kw)])
    _assert_states_equal(kept, state, lay.numel, "after a refused step")


def test_a_state_of_another_shape_or_dtype_at_the_same_address_is_refused() -> None:
    """A cached row is looked up by its state's addresses, dtypes and shapes: a view of another shape,
    or another dtype of the same shape, at the same address is checked again and refused before
    anything is written."""
    lay = layout_for(100, block_size=10, density=0.2, quant_block_size=5, window=2)
    p, g = torch.randn(100, device=DEVICE), torch.randn(100, device=DEVICE)
    state = _zero_state(lay)
    tk.microadam_step_triton(p, g, **_args(p, layout=lay, **state))
    wi = state["window_indices"]
    same_shape = torch.empty(0, dtype=torch.uint8, device=DEVICE).set_(wi.untyped_storage(), 0, wi.shape, wi.stride())
    for bad in (wi.view(wi.shape[0], -1, 1), same_shape):
        assert bad.data_ptr() == wi.data_ptr()
        before = {name: t.clone() for name, t in state.items()}
        saved = p.clone()
        with pytest.raises(ValueError, match="window_indices must be torch.int16 of shape"):
            tk.microadam_step_triton(p, g, **_args(p, layout=lay, **dict(state, window_indices=bad), step=2))
        assert torch.equal(p, saved) and all(torch.equal(state[name], before[name]) for name in state)


def test_one_launch_for_tensors_at_different_steps_and_hyperparameters(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors of one tile class share a launch even where their per-step columns differ: a tensor
    added later (another step count, so another ring slot and random-stream key), another param
    group's learning rate and betas, a non-contiguous parameter stepped in a copy. Each row must
    carry its own numbers: state bit-equal to the torch path, parameters within the tolerance."""
    if DEVICE != "cpu":
        pytest.skip("bit-equality with the torch path is a CPU claim (scatter_add order on CUDA)")
    launches = _count_launches(monkeypatch)
    gen = torch.Generator().manual_seed(11)
    lay = layout_for(60, block_size=64, density=0.05, quant_block_size=16, window=3)
    base = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, error_rounding="stochastic",
                stochastic_param_rounding=True, seed=1, release=0.5, release_scale=1.0)  # fmt: skip
    # (first step, hyperparameters, transposed parameter)
    tensors = [(1, {}, False), (3, {}, False), (1, dict(lr=3e-3, beta1=0.8), False), (2, {}, True)]
    params, refs, states, ref_states = [], [], [], []
    for _, _, transposed in tensors:
        p = torch.randn(6, 10, generator=gen)
        p = p.t().contiguous().t() if transposed else p
        params.append(p)
        refs.append(p.clone())
        states.append(_zero_state(lay))
        ref_states.append(_zero_state(lay))
    for step in range(1, 5):
        items = []
        for i, (first, hyper, _) in enumerate(tensors):
            g = torch.randn(6, 10, generator=gen)
            kw = dict(base, lr=1e-2, layout=lay, step=step + first - 1, param_index=i)
            kw.update(hyper)
            microadam_step(refs[i], g.clone(), **ref_states[i], **kw, impl="torch")
            items.append(dict(param=params[i], grad=g, **states[i], **kw))
        tk.microadam_step_triton_multi(items)
        for i in range(len(tensors)):
            where = f"step {step}, tensor {i}"
            _assert_states_equal(ref_states[i], states[i], lay.numel, where)
            assert_close(params[i], refs[i], torch.float32)
        assert launches == [(len(tensors),), (len(tensors),)], launches  # one of each kernel, all four
        launches.clear()
    assert not params[3].is_contiguous()


def test_each_launch_has_its_tensors_gpu_made_current(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton launches on the current CUDA device: each launch key's kernels run inside
    ``torch.cuda.device`` of that key's device (tensors of a model split over GPUs), CPU ones outside."""
    entered: list[Any] = []

    class Guard:
        def __init__(self, device: torch.device) -> None:
            self.device = device

        def __enter__(self) -> None:
            entered.append(self.device)

        def __exit__(self, *exc: Any) -> None:
            entered.append(None)

    launched = []
    monkeypatch.setattr(torch.cuda, "device", Guard)
    monkeypatch.setattr(tk, "_launch_batch", lambda key, batch: launched.append((str(key[0]), str(entered[-1]))))

    def work(device: str) -> Any:
        return types.SimpleNamespace(
            static=types.SimpleNamespace(key=(torch.device(device), 0)), copy_back=None, keep=(torch.zeros(1),)
        )

    tk._launch([work("cuda:1"), work("cuda:0"), work("cpu"), work("cuda:1")])
    assert launched == [("cuda:1", "cuda:1"), ("cuda:0", "cuda:0"), ("cpu", "None")]


# ---------------------------------------------------------------- through the optimizer


@pytest.mark.parametrize(
    "kwargs,dtype",
    [
        pytest.param(dict(window=3, density=0.1, block_size=32, quant_block_size=8), torch.float32, id="fp32"),
        pytest.param(
            dict(
                window=2, density=0.2, block_size=15, quant_block_size=5, weight_decay=0.1, error_rounding="stochastic"
            ),
            torch.bfloat16,
            id="bf16-odd-blocks",
        ),
        # The default variant (released error feedback).
        pytest.param(
            dict(window=3, density=0.1, block_size=32, quant_block_size=8, variant="release"),
            torch.float32,
            id="fp32-release",
        ),
        pytest.param(
            dict(window=2, density=0.2, block_size=15, quant_block_size=5, weight_decay=0.1, variant="release"),
            torch.bfloat16,
            id="bf16-odd-blocks-release",
        ),
        pytest.param(
            dict(window=2, density=0.25, block_size=4, quant_block_size=16, weight_decay=0.1, variant="release"),
            torch.float32,
            id="fp32-release-quant-larger",
        ),
    ],
)
def test_optimizer_with_triton_equals_reference(kwargs: dict[str, Any], dtype: torch.dtype) -> None:
    """As tests/test_reference_equivalence.py does for the torch path, with ``impl="triton"``."""
    kwargs = dict(lr=1e-2, **{"variant": "paper", **kwargs})
    gen = torch.Generator().manual_seed(11)
    init = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in ((7,), (45,), (9, 5))]
    fast = [torch.nn.Parameter(x.clone().to(DEVICE)) for x in init]
    slow = [x.clone() for x in init]
    opt = MicroAdam(fast, impl="triton", **kwargs)
    ref = reference_for(slow, kwargs, dtype)
    for _ in range(kwargs["window"] + 3):
        grads = [torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype) for x in init]
        for f, g in zip(fast, grads):
            f.grad = g.clone().to(DEVICE)
        opt.step()
        ref.step([g.clone() for g in grads])
    for i, (f, s) in enumerate(zip(fast, slow)):
        if kwargs["variant"] == "release" and dtype != torch.float32:
            # The kernels round a low-precision parameter twice at the window's positions
            # (test_kernels_match_torch_path checks by how much): the trajectories drift by ulps.
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(f.detach().cpu().double(), s.double(), rtol=4 * eps, atol=1e-5)
        else:
            assert_close(f.detach().cpu(), s, dtype)
        assert_state_matches_reference(opt, f, ref, i)


def test_a_new_tensor_the_kernels_refuse_raises_before_any_tensor_moves() -> None:
    """A tensor whose state is created in this step is prepared after the range check, but
    still before any tensor is written: a float64 parameter new to a Triton group raises its
    TypeError with the torch-path tensor of the other group unmoved."""
    a = torch.nn.Parameter(torch.randn(40))
    opt = MicroAdam([{"params": [a], "impl": "torch"}], lr=1e-2)
    a.grad = torch.randn(40)
    opt.step()
    d = torch.nn.Parameter(torch.randn(30, dtype=torch.float64))
    opt.add_param_group({"params": [d], "impl": "triton"})
    a.grad, d.grad = torch.randn(40), torch.randn(30, dtype=torch.float64)
    kept = a.detach().clone()
    with pytest.raises(TypeError, match="float64"):
        opt.step()
    assert torch.equal(a, kept) and opt.state[a]["step"] == 1


# The paper's variant in CI's slow pass (6 s): the default suite neared its 600 s on 2 cores (567 s on
# 2026-12-02), and the kernel checks above cover that variant step by step.
@pytest.mark.parametrize("variant", [pytest.param("paper", marks=pytest.mark.slow), "release"])
def test_tiny_model_trains_the_same_with_triton_and_torch(variant: str) -> None:
    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(DEVICE)

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=gen).to(DEVICE)
    y = x[:, :1] * 2 - x[:, 1:2]
    nets = {impl: model() for impl in ("torch", "triton")}
    opts = {
        impl: MicroAdam(
            net.parameters(),
            lr=3e-2,
            window=3,
            density=0.25,
            block_size=32,
            quant_block_size=8,
            impl=impl,
            variant=variant,
        )
        for impl, net in nets.items()
    }
    losses: dict[str, list[float]] = {"torch": [], "triton": []}
    for _ in range(8):
        for impl, net in nets.items():
            opts[impl].zero_grad()
            loss = (net(x) - y).square().mean()
            loss.backward()
            opts[impl].step()
            losses[impl].append(loss.item())
    assert losses["triton"][-1] < 0.8 * losses["triton"][0], losses["triton"]
    torch.testing.assert_close(losses["triton"], losses["torch"], rtol=1e-4, atol=1e-6)
    for a, b in zip(nets["triton"].parameters(), nets["torch"].parameters()):
        assert_close(a.detach().cpu(), b.detach().cpu())
        sa, sb = opts["triton"].state[a], opts["torch"].state[b]
        for name in ("window_indices", "error_codes", "error_bounds", "window_values"):
            assert torch.equal(sa[name].view(torch.uint8), sb[name].view(torch.uint8)), name


# ---------------------------------------------------------------- availability and errors


def test_available_in_interpreter_or_with_cuda() -> None:
    assert tk.available() == (True, "")
    assert availability("triton") == (True, "")


_WITHOUT_INTERPRETER = """
import importlib, os, sys
import torch
from microadam import MicroAdam
from microadam.functional import microadam_step
from microadam.kernels import triton_kernels as tk
from microadam.layout import layout_for

ok, why = tk.available()
print(ok)
print(why)
p = torch.nn.Parameter(torch.ones(3))
p.grad = torch.ones(3)
try:
    MicroAdam([p], lr=1e-3, impl="triton", variant="paper").step()
except RuntimeError as e:
    print("RuntimeError:", e)

# triton.language is now imported in compiled mode, as when another library imports triton before a
# test sets TRITON_INTERPRET: kernels decorated after setting it must still run.
os.environ["TRITON_INTERPRET"] = "1"
importlib.reload(tk)
lay = layout_for(70, block_size=64, density=0.05, quant_block_size=16, window=2)
results = []
for impl in ("torch", "triton"):
    torch.manual_seed(0)
    q = torch.randn(70)
    state = dict(
        window_indices=torch.zeros((2, lay.num_blocks, lay.k), dtype=torch.int16),
        window_values=torch.zeros((2, lay.num_blocks, lay.k), dtype=torch.bfloat16),
        error_codes=torch.zeros(35, dtype=torch.uint8),
        error_bounds=torch.zeros((lay.num_quant_blocks, 2), dtype=torch.bfloat16),
    )
    step = tk.microadam_step_triton if impl == "triton" else microadam_step
    step(q, torch.randn(70), **state, layout=lay, step=1, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
         weight_decay=0.0, error_rounding="nearest", stochastic_param_rounding=True, seed=0, param_index=0)
    results.append(state["window_indices"])
print(torch.equal(*results))

# Without the triton package at all (the optional extra not installed):
sys.modules["triton"] = None
print(importlib.reload(tk).available()[1])
"""


@pytest.mark.slow  # 8 s (a fresh process importing torch twice): the default suite took 612 s (2026-12-01)
def test_unavailable_without_interpreter_or_cuda_says_how_to_fix() -> None:
    """A fresh process with neither TRITON_INTERPRET nor a GPU (then neither triton): a clear error
    that names the fix, and no silent fallback to the torch path."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run(
        [sys.executable, "-c", _WITHOUT_INTERPRETER], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "False"
    for words in ("CUDA", "TRITON_INTERPRET=1", "impl='torch'"):
        assert words in lines[1]
    assert lines[2] == f"RuntimeError: {lines[1]}"
    assert lines[3] == "True", "interpreted kernels failed after a compiled-mode import of triton"
    assert "pip install triton" in lines[4] and "impl='torch'" in lines[4]


_COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from microadam.kernels import triton_kernels as tk

compress = dict(prog_tensor="*i32", prog_local="*i32", meta_i="*i64", meta_f="*fp32")
update = dict(compress, weights="*fp32")
paper = dict(RELEASE=False, PARAM_KIND=0, LOG_CP2=3, LOG_RP2=0)
c = tk._compress_kernel
variants = [
    (c, compress, dict(RP2=4, CP2=8, TK_MODE=0, Q_MODE=2, PAIRS=False, GRAD_KIND=3, RADIX_BITS=4, **paper)),
    (c, compress, dict(RP2=8, CP2=8, TK_MODE=2, Q_MODE=1, PAIRS=True, GRAD_KIND=2, RADIX_BITS=1, **paper)),
    # Released error feedback (rows are quantization blocks), each parameter kind; the second is
    # the default layout's tile (32 quantization blocks of 128 in a Top-K block of 4096).
    (c, compress, dict(RP2=4, CP2=16, TK_MODE=1, Q_MODE=0, PAIRS=True, GRAD_KIND=1, RADIX_BITS=2,
                       RELEASE=True, PARAM_KIND=1, LOG_CP2=4, LOG_RP2=2)),
    (c, compress, dict(RP2=32, CP2=128, TK_MODE=1, Q_MODE=0, PAIRS=True, GRAD_KIND=0, RADIX_BITS=2,
                       RELEASE=True, PARAM_KIND=0, LOG_CP2=7, LOG_RP2=5)),
    (c, compress, dict(RP2=2, CP2=8, TK_MODE=0, Q_MODE=0, PAIRS=False, GRAD_KIND=2, RADIX_BITS=4,
                       RELEASE=True, PARAM_KIND=2, LOG_CP2=3, LOG_RP2=1)),
    # ... and a quantization block of several rows (4 Top-K blocks of 16).
    (c, compress, dict(RP2=4, CP2=16, TK_MODE=0, Q_MODE=1, PAIRS=True, GRAD_KIND=0, RADIX_BITS=2,
                       RELEASE=True, PARAM_KIND=1, LOG_CP2=4, LOG_RP2=2)),
    (tk._update_kernel, update, dict(KP2=4, MP2=4, DT=64, PARAM_KIND=1, VEC_SLOTS=True, CH=4)),
    (tk._update_kernel, update, dict(KP2=16, MP2=4, DT=64, PARAM_KIND=2, VEC_SLOTS=False, CH=16)),
    (tk._update_kernel, update, dict(KP2=8, MP2=2, DT=64, PARAM_KIND=0, VEC_SLOTS=True, CH=8)),
    # The default layout's update tile (k = 41, window 10, blocks of 4096), with the launcher's warps.
    (tk._update_kernel, update, dict(KP2=64, MP2=16, DT=1024, PARAM_KIND=1, VEC_SLOTS=False, CH=64)),
    # The Guard's max_density (0.1, k = 410) at blocks of 4096: compared whole it took 70 s to compile.
    (tk._update_kernel, update, dict(KP2=512, MP2=16, DT=1024, PARAM_KIND=1, VEC_SLOTS=False, CH=64)),
]
for kernel, sig, constexprs in variants:
    src = ASTSource(kernel, dict(sig, **{name: "constexpr" for name in constexprs}), constexprs=constexprs)
    # The warps the launcher gives each tile (_launch_batch): races between warps show in the PTX.
    if kernel is tk._update_kernel:
        kp2, mp2 = constexprs["KP2"], constexprs["MP2"]
        elements = max(constexprs["DT"], mp2 * kp2 * kp2 if constexprs["VEC_SLOTS"] else kp2 * constexprs["CH"])
        assert constexprs["CH"] == tk.update_chunk(kp2)
    else:
        elements = constexprs["RP2"] * constexprs["CP2"]
    options = dict(enable_fp_fusion=False, num_warps=tk._num_warps(elements))
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
    # torch rounds every product, quotient and square root: no contraction, no approximations.
    for op in ("fma.rn.f32", "div.full.f32", "div.approx.f32", "sqrt.approx.f32"):
        assert op not in ptx, (kernel.__name__, constexprs, op)
    if kernel is tk._update_kernel:
        # A window position is loaded by several warps: a barrier must separate every load of the
        # parameter from the first store into it (else lr * u, or the decay, can apply twice).
        assert "bar.sync" in ptx and ptx.index("bar.sync") < ptx.index("st.global"), (constexprs, "no barrier")
print("compiled", len(variants))
"""


@pytest.mark.slow  # half a minute of compiling on 2 cores
def test_kernels_compile_for_a_gpu_without_one(tmp_path: Any) -> None:
    """The interpreter accepts code that the compiler rejects (types, shapes, constexpr rules):
    compile every constexpr branch for sm_90 (Triton ships ptxas, no GPU needed) and check the PTX
    holds no fused multiply-add and no approximate division or square root, and that the update kernel
    orders its parameter loads before its stores with a barrier (a race the interpreter cannot show)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "compiled 11" in out.stdout


def _args(param: torch.Tensor, **over: Any) -> dict[str, Any]:
    lay = layout_for(param.numel(), block_size=64, density=0.1, quant_block_size=16, window=2)
    args = dict(
        **_zero_state(lay),
        layout=lay,
        step=1,
        lr=1e-2,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        error_rounding="nearest",
        stochastic_param_rounding=True,
        seed=0,
        param_index=0,
    )
    args.update(over)
    return args


def test_float64_parameter_is_refused_with_the_fix() -> None:
    p = torch.zeros(5, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64.*impl='torch'"):
        tk.microadam_step_triton(p, torch.zeros_like(p), **_args(p))


def test_bad_arguments_raise_value_errors() -> None:
    p = torch.zeros(5, device=DEVICE)
    with pytest.raises(ValueError, match="error_rounding"):
        tk.microadam_step_triton(p, torch.zeros_like(p), **_args(p, error_rounding="up"))
    with pytest.raises(ValueError, match="numel"):
        tk.microadam_step_triton(p, torch.zeros(6, device=DEVICE), **_args(p))
    lay = layout_for(100, block_size=10, density=0.1, quant_block_size=4, window=2)
    q = torch.zeros(100, device=DEVICE)
    with pytest.raises(ValueError, match="divide"):
        tk.microadam_step_triton(q, torch.zeros_like(q), **_args(q, layout=lay, **_zero_state(lay)))
    # Release sums a quantization block's squares in tile order: not for blocks of several rows whose
    # sizes are not powers of two.
    lay = layout_for(100, block_size=12, density=0.1, quant_block_size=24, window=2)
    state = _zero_state(lay)
    before = {name: t.clone() for name, t in state.items()}
    with pytest.raises(ValueError, match=r"powers of two.*quant_block_size=24 and block_size=12.*impl='torch'"):
        tk.microadam_step_triton(q, torch.ones_like(q), **_args(q, layout=lay, **state, release=0.5))
    # Refused before anything was written.
    assert all(torch.equal(state[name], before[name]) for name in state) and not q.any()
    # A quantization block above 32768 over several Top-K blocks would be a tile of that many elements
    # (it would not compile in useful time on a GPU): refused before anything is written. One Top-K
    # block is one tile row whatever the quantization block, and is stepped.
    lay = layout_for(100, block_size=16, density=0.1, quant_block_size=2**16, window=2)
    state = _zero_state(lay)
    with pytest.raises(ValueError, match=r"quant_block_size must be <= 32768.*got quant_block_size=65536"):
        tk.microadam_step_triton(q, torch.ones_like(q), **_args(q, layout=lay, **state))
    assert not any(t.any() for t in state.values()) and not q.any()
    # More than 1024 entries per block: the update kernel's tile would exceed Triton's largest
    # tensor after the compress kernel had written the ring slot (a half-applied step). Refused first.
    big = torch.zeros(2000, device=DEVICE)
    lay = layout_for(2000, block_size=4096, density=0.6, quant_block_size=128, window=2)
    state = _zero_state(lay)
    with pytest.raises(ValueError, match=r"at most 1024 entries per Top-K block, got k=1200"):
        tk.microadam_step_triton(big, torch.ones_like(big), **_args(big, layout=lay, **state, release=0.5))
    assert not any(t.any() for t in state.values()) and not big.any()
    # k within the bound but a window whose tile of next_pow2(window) * next_pow2(k) is not.
    lay = layout_for(2000, block_size=4096, density=0.5, quant_block_size=128, window=1025)
    state = _zero_state(lay)
    with pytest.raises(ValueError, match=r"window=1025 and k=1000"):
        tk.microadam_step_triton(big, torch.ones_like(big), **_args(big, layout=lay, **state))
    assert not any(t.any() for t in state.values()) and not big.any()
    one = torch.zeros(10, device=DEVICE)
    lay = layout_for(10, block_size=16, density=0.1, quant_block_size=2**16, window=2)
    tk.microadam_step_triton(one, torch.ones_like(one), **_args(one, layout=lay, **_zero_state(lay)))
    assert one.any()
    # A state of another layout (e.g. window edited in param_groups): the kernels index raw pointers,
    # so it is refused, not read or written out of bounds.
    lay = layout_for(100, block_size=10, density=0.1, quant_block_size=5, window=2)
    # (Every tensor of the other layout differs in shape: window, k, elements, quantization blocks.)
    for name, other in _zero_state(layout_for(98, block_size=10, density=0.2, quant_block_size=10, window=4)).items():
        state = {**_zero_state(lay), name: other}
        with pytest.raises(ValueError, match=f"{name}.*another layout.*reconfigure"):
            tk.microadam_step_triton(q, torch.ones_like(q), **_args(q, layout=lay, **state))
    assert not q.any()


# The interpreter computes in numpy, which warns where a window value's square overflows to Inf (that
# element's update is then 0, as the torch path's and AdamW's).
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
# The default variant in the default suite, the paper's in CI's slow pass.
@pytest.mark.parametrize("variant", ["release", pytest.param("paper", marks=pytest.mark.slow)])
@pytest.mark.parametrize("pattern", LIMIT_PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients_up_to_the_limit_leave_state_finite_and_beyond_it_are_skipped(
    dtype: torch.dtype, pattern: str, variant: str
) -> None:
    """As tests/test_robustness.py checks the torch and C++ paths: no NaN or Inf in the state or the
    parameter after steps of gradients at GRAD_LIMIT, and a step beyond the limit skipped."""
    step_at_the_grad_limit("triton", dtype, pattern, variant, steps=8, device=DEVICE)


def test_empty_tensor_is_a_no_op() -> None:
    p = torch.zeros(0, device=DEVICE)
    tk.microadam_step_triton(p, torch.zeros_like(p), **_args(p))


def test_a_negative_zero_lr_is_not_taken_for_zero_from_the_cache() -> None:
    """The float row is cached per step, and -0.0 == 0.0 as a cache key: a group with lr=-0.0 stepped
    after one with lr=0.0 got +0.0, and p - lr * u differed from the torch path's in a zero's sign."""
    groups = [(0.0, 0.0), (-0.0, -0.0)]  # (lr, the parameter's value)
    got, want = [], []
    for impl, out in (("triton", got), ("torch", want)):
        params = [torch.full((8,), value, device=DEVICE) for _, value in groups]
        lay = layout_for(8, block_size=8, density=0.5, quant_block_size=8, window=2)
        grad = torch.linspace(-1, 1, 8, device=DEVICE)
        for i, ((lr, _), p) in enumerate(zip(groups, params)):
            state = _zero_state(lay)
            microadam_step(p, grad.clone(), **_args(p, layout=lay, **state, lr=lr, param_index=i), impl=impl)
        out.extend(p.clone() for p in params)
    for g, w in zip(got, want):
        assert torch.equal(g.view(torch.int32), w.view(torch.int32)), (g, w)


def test_a_step_bumps_the_parameters_version_counter() -> None:
    """Raw-pointer writes bypassed autograd's version counter: a graph that saved the parameter before
    the step backpropagated through the stepped values in silence (found by an audit)."""
    p = torch.nn.Parameter(torch.randn(100, device=DEVICE))
    opt = MicroAdam([p], lr=1e-2, impl="triton", block_size=64, density=0.1, quant_block_size=16, window=2)
    p.grad = torch.randn_like(p)
    opt.step()
    y = (p * p).sum()
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_a_window_index_outside_its_block_writes_nothing_outside_the_parameter() -> None:
    """A corrupt window index (in memory; loads check them) made the update kernel write past the
    parameter, into what the allocator put after it (found by an audit)."""
    buf = torch.zeros(200, device=DEVICE)
    p = buf[:100]
    args = _args(p)
    tk.microadam_step_triton(p, torch.randn(100, device=DEVICE), **args)
    args["window_indices"][0, 1, 0] = 50  # the last block holds 36 elements: position 114
    tk.microadam_step_triton(p, torch.randn(100, device=DEVICE), **dict(args, step=2))
    assert torch.count_nonzero(buf[100:]) == 0
    assert torch.count_nonzero(p) > 0
