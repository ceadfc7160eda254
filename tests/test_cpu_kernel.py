"""impl="cpp" (microadam.kernels.cpu) equals the vectorized torch path bit for bit.

Every case runs the same gradients through ``functional.microadam_step`` with ``impl="torch"`` and
``impl="cpp"`` on copies of one state, for more steps than the window holds (so the ring wraps),
and compares the bit patterns (not values: -0.0 and +0.0 differ) of the parameter and of every
state tensor after every step. No tolerance anywhere: the C++ code does the torch path's float32
operations in the same order, and calls the same sqrt as torch (see ``cpu._matching_sqrt``).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from microadam import MicroAdam, functional
from microadam.kernels import availability, cpu, load_multi, load_phases
from microadam.layout import Layout, layout_for

STEPS = 16

_INT_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.int16: torch.int16,
    torch.uint8: torch.uint8,
}


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a, e = actual.contiguous().view(_INT_VIEW[actual.dtype]), expected.contiguous().view(_INT_VIEW[expected.dtype])
    if not torch.equal(a, e):
        bad = (a != e).nonzero()
        first = tuple(bad[0].tolist())
        raise AssertionError(
            f"{what}: {bad.shape[0]} of {a.numel()} elements differ; first at {first}: "
            f"cpp {actual[first].item()!r} vs torch {expected[first].item()!r}"
        )


@dataclasses.dataclass(frozen=True)
class Shape:
    id: str
    shape: tuple[int, ...]
    block: int
    density: float
    quant_block: int
    window: int
    transposed: bool = False

    def layout(self) -> Layout:
        numel = 1
        for s in self.shape:
            numel *= s
        return layout_for(
            numel, block_size=self.block, density=self.density, quant_block_size=self.quant_block, window=self.window
        )


SHAPES = [
    Shape("empty", (0,), 64, 0.05, 16, 4),
    Shape("one", (1,), 64, 0.05, 16, 4),
    Shape("seven", (7,), 64, 0.05, 16, 4),
    # The last Top-K block holds 1 element, fewer than k = 4: the padding selections.
    Shape("just-over-block", (65,), 64, 0.05, 16, 4),
    # Odd quantization blocks straddle code bytes; units of lcm(15, 5, 2) = 30.
    Shape("odd-blocks", (203,), 15, 0.2, 5, 3),
    Shape("quant-block-larger", (1000,), 32, 0.1, 64, 4),
    Shape("k-equals-block", (100,), 16, 1.0, 16, 2),
    Shape("window-1", (300,), 64, 0.05, 16, 1),
    Shape("not-a-multiple", (1031,), 128, 0.03, 32, 5),
    Shape("transposed", (37, 29), 64, 0.05, 16, 4, transposed=True),
    # Many candidates per block: the vectorized Top-K's wide search.
    Shape("big-k", (5000,), 1024, 0.25, 128, 3),
    # The optimizer's defaults on a tensor of 3 full blocks and a partial one.
    Shape("paper-defaults", (3 * 4096 + 123,), 4096, 0.01, 128, 10),
    # Odd quantization blocks wide enough for the vector loops, which then start at odd positions:
    # smaller and larger than the Top-K block.
    Shape("odd-wide-quant", (500,), 34, 0.1, 17, 3),
    Shape("odd-wide-quant-larger", (700,), 17, 0.2, 51, 3),
    # Neither size divides the other (the functional API takes it; MicroAdam refuses it): the decode
    # is cut at both kinds of boundary.
    Shape("neither-divides", (1000,), 64, 0.05, 48, 3),
]


@dataclasses.dataclass(frozen=True)
class Flags:
    id: str
    weight_decay: float = 0.0
    error_rounding: str = "nearest"
    stochastic_param_rounding: bool = True
    position_offset: int = 0
    chunk_size: int = functional.DEFAULT_CHUNK
    grads: str = "normal"  # normal | ties | sparse | zeros | signed-zeros
    eps: float = 1e-8
    grad_dtype: torch.dtype | None = None  # None: the parameter's dtype
    transposed_grad: bool = False
    release: float = 0.0
    release_scale: float = 1.0


FLAGS = [
    Flags("plain"),
    Flags("wd-stochastic-error", weight_decay=0.1, error_rounding="stochastic"),
    Flags(
        "offset-no-param-rounding", error_rounding="stochastic", stochastic_param_rounding=False, position_offset=12345
    ),
    Flags("wd-offset-chunked", weight_decay=0.05, position_offset=7, chunk_size=64),
    # Released error feedback (MicroAdam(release=...)): all of it, and part of it with weight decay.
    Flags("release-all", release=1.0),
    Flags("release-half-wd", release=0.5, release_scale=0.7, weight_decay=0.1, error_rounding="stochastic"),
]

# Rows for the corners of the data rather than of the layout.
EXTRA = [
    # Few distinct gradient values: ties at the k-th place, broken by the lower index.
    (SHAPES[8], Flags("ties", grads="ties")),
    (SHAPES[11], Flags("ties", grads="ties", weight_decay=0.01)),
    # Most rows untouched (an embedding): Top-K ties at zero.
    (SHAPES[10], Flags("sparse", grads="sparse")),
    (SHAPES[11], Flags("sparse", grads="sparse", error_rounding="stochastic")),
    # All-zero gradients and eps = 0: the den == 0 guard.
    (SHAPES[8], Flags("zeros-eps0", grads="zeros", eps=0.0)),
    (SHAPES[4], Flags("sparse-eps0", grads="sparse", eps=0.0, weight_decay=0.1)),
    # A float32 gradient for a low-precision parameter (autocast-style), and a non-contiguous one.
    (SHAPES[8], Flags("fp32-grad", grad_dtype=torch.float32)),
    (SHAPES[11], Flags("bf16-grad", grad_dtype=torch.bfloat16, weight_decay=0.1)),
    (SHAPES[8], Flags("fp16-grad", grad_dtype=torch.float16, error_rounding="stochastic")),
    (SHAPES[8], Flags("fp64-grad", grad_dtype=torch.float64)),
    (SHAPES[9], Flags("transposed-grad", transposed_grad=True, weight_decay=0.1)),
    # Released error feedback on blocks whose residual is all zero (rms 0: no move) and on ties.
    (SHAPES[11], Flags("release-sparse", grads="sparse", release=0.5)),
    (SHAPES[8], Flags("release-zeros", grads="zeros", release=1.0, eps=0.0)),
    (SHAPES[8], Flags("release-ties", grads="ties", release=0.25, release_scale=2.0)),
    (SHAPES[8], Flags("release-signed-zeros", grads="signed-zeros", release=0.5)),
    (SHAPES[11], Flags("signed-zeros", grads="signed-zeros")),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def new_state(lay: Layout) -> dict[str, torch.Tensor]:
    """Zero state, as MicroAdam._init_state builds it."""
    return dict(
        window_indices=torch.zeros((lay.window, lay.num_blocks, lay.k), dtype=torch.int16),
        window_values=torch.zeros((lay.window, lay.num_blocks, lay.k), dtype=torch.bfloat16),
        error_codes=torch.zeros((lay.numel + 1) // 2, dtype=torch.uint8),
        error_bounds=torch.zeros((lay.num_quant_blocks, 2), dtype=torch.bfloat16),
    )


def make_tensor(shape: Shape, dtype: torch.dtype, gen: torch.Generator, transposed: bool) -> torch.Tensor:
    if transposed and len(shape.shape) == 2:
        t = torch.randn(shape.shape[::-1], generator=gen, dtype=torch.float64).to(dtype).t()
        assert not t.is_contiguous()
        return t
    return torch.randn(shape.shape, generator=gen, dtype=torch.float64).to(dtype)


def make_grad(shape: Shape, flags: Flags, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    g = make_tensor(shape, torch.float64, gen, flags.transposed_grad)
    if flags.grads == "ties":
        g = g.mul(2).round()  # about 7 distinct values
    elif flags.grads == "sparse":
        keep = torch.rand(g.shape, generator=gen, dtype=torch.float64) < 0.03
        g = g * keep
    elif flags.grads == "zeros":
        g = torch.zeros_like(g)
    elif flags.grads == "signed-zeros":
        # +0, -0 and the smallest negative float32 (release halves it to -0) with a few normal
        # values for the Top-K: which zero a block's min or max is depends on the order of the
        # comparisons, unless every path makes it +0.
        r = torch.rand(g.shape, generator=gen, dtype=torch.float64)
        tiny = torch.full_like(g, -(2.0**-149))
        g = torch.where(r < 0.03, g, torch.where(r < 0.5, tiny, torch.where(r < 0.75, -0.0, 0.0)))
    return g.to(flags.grad_dtype or dtype)


def run_both(shape: Shape, flags: Flags, dtype: torch.dtype, steps: int = STEPS) -> None:
    """``steps`` steps with impl torch and cpp on copies; every bit equal after every step."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{shape.id}/{flags.id}/{dtype}".encode()))
    lay = shape.layout()
    p_torch = make_tensor(shape, dtype, gen, shape.transposed)
    p_cpp = p_torch.clone() if not shape.transposed else p_torch.t().clone().t()
    assert p_cpp.is_contiguous() == p_torch.is_contiguous()
    s_torch, s_cpp = new_state(lay), new_state(lay)
    hyper = dict(
        layout=lay,
        lr=1e-2,
        beta1=0.9,
        beta2=0.999,
        eps=flags.eps,
        weight_decay=flags.weight_decay,
        error_rounding=flags.error_rounding,
        stochastic_param_rounding=flags.stochastic_param_rounding,
        seed=11,
        param_index=3,
        chunk_size=flags.chunk_size,
        position_offset=flags.position_offset,
    )
    if flags.release:
        hyper.update(release=flags.release, release_scale=flags.release_scale)
    for step in range(1, steps + 1):
        g = make_grad(shape, flags, dtype, gen)
        functional.microadam_step(p_torch, g, step=step, impl="torch", **s_torch, **hyper)
        functional.microadam_step(p_cpp, g.clone(), step=step, impl="cpp", **s_cpp, **hyper)
        assert_bits_equal(p_cpp, p_torch, f"parameter after step {step}")
        for name in s_torch:
            assert_bits_equal(s_cpp[name], s_torch[name], f"{name} after step {step}")
    assert p_cpp.is_contiguous() == p_torch.is_contiguous()


CASES = [
    pytest.param(shape, flags, dtype, id=f"{shape.id}-{flags.id}-{str(dtype)[6:]}")
    for shape in SHAPES
    for flags in FLAGS
    for dtype in DTYPES
] + [
    pytest.param(shape, flags, dtype, id=f"{shape.id}-{flags.id}-{str(dtype)[6:]}")
    for shape, flags in EXTRA
    for dtype in DTYPES
]


@pytest.mark.parametrize(("shape", "flags", "dtype"), CASES)
def test_cpp_equals_torch_bit_for_bit(shape: Shape, flags: Flags, dtype: torch.dtype) -> None:
    run_both(shape, flags, dtype)


def _cpu_has(flag: str) -> bool:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return False
    return any(flag in line.split() for line in lines if line.startswith("flags"))


# Builds other than this CPU's own (-march=native), each with the flags that select its loops:
# the plain C++ loops a CPU without AVX2 runs, and the AVX2 loops of a CPU without AVX-512; and this
# CPU's own with the phase counters of benchmarks/cpu_phases.py (which must not change a bit).
BUILDS = {
    "portable": ((), None),
    "x86-64-v3": (("-march=x86-64-v3",), "avx2"),
    "profile": ((*cpu._NATIVE, "-DMICROADAM_PROFILE"), None),
}


def _build(name: str):
    """The library built as BUILDS[name] says, and its sqrt (skipped, saying why, where this CPU cannot run it)."""
    extra, needs = BUILDS[name]
    if needs is not None and not _cpu_has(needs):
        pytest.skip(f"this CPU has no {needs}: the {name} build cannot run here")
    compiler = cpu.shutil.which(cpu._COMPILER)
    assert compiler is not None, "the tests need g++"
    path = cpu._build(compiler, (*cpu._FLAGS, *extra), name if extra else "", cpu._SOURCE.read_bytes())
    lib = cpu.ctypes.CDLL(str(path))
    cpu._declare(lib)
    return lib, cpu._matching_sqrt(lib)


@pytest.fixture(scope="module", params=list(BUILDS))
def other_build(request):
    return _build(request.param)


@pytest.mark.parametrize(
    ("shape", "dtype"), [pytest.param(s, d, id=f"{s.id}-{str(d)[6:]}") for s in SHAPES for d in DTYPES]
)
def test_other_builds_equal_torch(other_build, monkeypatch, shape: Shape, dtype: torch.dtype) -> None:
    monkeypatch.setattr(cpu, "_state", {"lib": other_build})
    run_both(shape, FLAGS[1], dtype)
    run_both(shape, FLAGS[2], dtype, steps=5)
    run_both(shape, FLAGS[5], dtype, steps=5)


def test_float64_runs_the_torch_path() -> None:
    lay = layout_for(300, block_size=64, density=0.05, quant_block_size=16, window=3)
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(300, generator=gen, dtype=torch.float64)
    q = p.clone()
    sa, sb = new_state(lay), new_state(lay)
    hyper = dict(layout=lay, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    hyper.update(error_rounding="stochastic", stochastic_param_rounding=True, seed=0, param_index=0)
    for step in range(1, 6):
        g = torch.randn(300, generator=gen, dtype=torch.float64)
        functional.microadam_step(p, g, step=step, impl="torch", **sa, **hyper)
        functional.microadam_step(q, g, step=step, impl="cpp", **sb, **hyper)
    assert_bits_equal(q, p, "float64 parameter")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_optimizer_with_impl_cpp_equals_torch(dtype: torch.dtype) -> None:
    """MicroAdam(impl="cpp") on a small model whose gradients depend on the parameters."""

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(37, 64), torch.nn.Tanh(), torch.nn.Linear(64, 5))
        return model.to(dtype)

    kwargs = dict(lr=1e-2, window=4, density=0.05, block_size=256, quant_block_size=32, weight_decay=0.01)
    models = {impl: build() for impl in ("torch", "cpp")}
    opts = {impl: MicroAdam(m.parameters(), impl=impl, **kwargs) for impl, m in models.items()}
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = torch.randn(16, 37, generator=gen).to(dtype)
        y = torch.randint(0, 5, (16,), generator=gen)
        for impl, model in models.items():
            opts[impl].zero_grad()
            torch.nn.functional.cross_entropy(model(x).float(), y).backward()
            opts[impl].step()
    for (name, pt), pc in zip(models["torch"].named_parameters(), models["cpp"].parameters()):
        assert_bits_equal(pc.detach(), pt.detach(), name)
        st, sc = opts["torch"].state[pt], opts["cpp"].state[pc]
        assert st["step"] == sc["step"] == 20
        for key in ("window_indices", "window_values", "error_codes", "error_bounds"):
            assert_bits_equal(sc[key], st[key], f"{name} {key}")


def test_available_on_this_machine() -> None:
    assert cpu.available() == (True, "")
    assert availability("cpp") == (True, "")


def test_chosen_sqrt_matches_torch() -> None:
    """The kernel's sqrt is torch's float32 sqrt, bit for bit, over the whole non-negative range."""
    lib, (sqrt_fn, sqrt_mode) = cpu._library()
    gen = torch.Generator().manual_seed(5)
    bits = torch.randint(0, 0x7F800001, (2**20,), generator=gen, dtype=torch.int32)
    x = bits.view(torch.float32)  # every non-negative float up to +inf: zeros and subnormals too
    for batch in (x, x[(x >= 2**-126) & (x <= 3.0e38)]):  # the second: no value leaves the fast path
        for n in (batch.numel(), 400, 7):
            out = torch.empty_like(batch[:n])
            lib.microadam_sqrt_probe(batch.data_ptr(), out.data_ptr(), n, sqrt_fn, sqrt_mode)
            assert_bits_equal(out, batch[:n].sqrt(), f"sqrt of {n} values")


def test_no_compiler_is_reported(monkeypatch) -> None:
    monkeypatch.setattr(cpu, "_state", {})
    monkeypatch.setattr(cpu.shutil, "which", lambda name: None)
    ok, why = cpu.available()
    assert not ok
    assert "g++" in why and "impl='torch'" in why
    with pytest.raises(RuntimeError, match="impl='torch'"):
        functional.microadam_step(torch.zeros(4), torch.zeros(4), impl="cpp", **_small_args(4))


def test_compile_error_is_reported_with_the_compiler_output(monkeypatch, tmp_path: Path) -> None:
    bad = tmp_path / "broken.cpp"
    bad.write_text("int main( { this is not C++ }\n")
    monkeypatch.setattr(cpu, "_state", {})
    monkeypatch.setattr(cpu, "_SOURCE", bad)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ok, why = cpu.available()
    assert not ok
    assert "could not compile broken.cpp" in why and "error" in why and "impl='torch'" in why
    assert not list((tmp_path / "cache" / "microadam").glob("*.so")), "a failed build must leave no library"


# In CI's slow pass: the default suite took 626 s of its 600 on 2 cores (2026-12-01). 13 s.
@pytest.mark.slow
def test_build_cache_is_keyed_and_atomic(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    compiler = cpu.shutil.which(cpu._COMPILER)
    source = cpu._SOURCE.read_bytes()
    # Two builds at once (as two processes would): each writes its own temporary file and renames it.
    paths: list[Path] = []
    threads = [
        threading.Thread(target=lambda: paths.append(cpu._build(compiler, cpu._FLAGS, "", source))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(paths) == 2 and paths[0] == paths[1]
    assert sorted(p.name for p in (tmp_path / "microadam").iterdir()) == [paths[0].name], "no temporary files left"
    mtime = paths[0].stat().st_mtime_ns
    assert cpu._build(compiler, cpu._FLAGS, "", source) == paths[0] and paths[0].stat().st_mtime_ns == mtime
    # Another source, other flags or another CPU each get their own library.
    assert cpu._library_path(compiler, cpu._FLAGS, "", source) == paths[0]
    assert cpu._library_path(compiler, cpu._FLAGS, "", source + b"\n// edited\n") != paths[0]
    assert cpu._library_path(compiler, (*cpu._FLAGS, "-O2"), "", source) != paths[0]
    assert cpu._library_path(compiler, cpu._FLAGS, "another cpu", source) != paths[0]


def _small_args(n: int, **overrides) -> dict:
    lay = layout_for(n, block_size=64, density=0.05, quant_block_size=16, window=3)
    args = dict(new_state(lay), layout=lay, step=1, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    args.update(error_rounding="nearest", stochastic_param_rounding=True, seed=0, param_index=0)
    args.update(overrides)
    return args


def test_tensors_off_the_cpu_are_refused() -> None:
    with pytest.raises(ValueError, match="impl='cpp' runs on CPU tensors, but param is on meta"):
        cpu.microadam_step_cpp(torch.empty(10, device="meta"), torch.zeros(10), **_small_args(10))
    with pytest.raises(ValueError, match="error_codes is on meta"):
        args = _small_args(10)
        args["error_codes"] = torch.empty_like(args["error_codes"], device="meta")
        cpu.microadam_step_cpp(torch.zeros(10), torch.zeros(10), **args)


def test_state_of_another_layout_is_refused() -> None:
    args = _small_args(100)
    args["window_indices"] = torch.zeros(3, 2, 5, dtype=torch.int16)
    with pytest.raises(ValueError, match="window_indices must be torch.int16 of shape"):
        cpu.microadam_step_cpp(torch.zeros(100), torch.zeros(100), **args)
    with pytest.raises(ValueError, match="layout.numel"):
        cpu.microadam_step_cpp(torch.zeros(99), torch.zeros(99), **_small_args(100))
    with pytest.raises(ValueError, match="error_rounding"):
        cpu.microadam_step_cpp(torch.zeros(100), torch.zeros(100), **_small_args(100, error_rounding="up"))


@pytest.mark.parametrize("beta2", [-0.0, -0.5])
def test_beta2_with_a_sign_bit_is_refused_and_changes_nothing(beta2: float) -> None:
    """The C++ step marks an unseen position by the sign of its second-moment sum (update_block):
    weights beta2**age with a sign bit would count a position twice, so the call is refused, before
    anything is written, with the torch path named as the way out."""
    args = _small_args(100, beta2=beta2)
    param, before = torch.randn(100), {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    saved = param.clone()
    with pytest.raises(ValueError, match=r"impl='cpp' needs beta2 >= \+0.*use impl='torch'"):
        cpu.microadam_step_cpp(param, torch.randn(100), **args)
    assert torch.equal(param, saved) and all(torch.equal(args[k], v) for k, v in before.items())


def test_corrupt_window_indices_raise() -> None:
    args = _small_args(100)
    args["window_indices"][0, 1, 0] = 60  # block 1 holds 36 elements
    with pytest.raises(RuntimeError, match="corrupt"):
        cpu.microadam_step_cpp(torch.zeros(100), torch.randn(100), **dict(args, step=2))
    # The thread's scratch was left clean: a valid step afterwards still equals the torch path.
    run_both(SHAPES[8], FLAGS[0], torch.float32, steps=3)


def test_in_place_update_bumps_the_version_counter() -> None:
    p = torch.zeros(100)
    before = p._version
    cpu.microadam_step_cpp(p, torch.randn(100), **_small_args(100))
    assert p._version > before
    assert bool((p != 0).any())


def test_impl_none_picks_cpp_for_cpu_tensors_it_computes_and_torch_otherwise():
    from microadam.kernels import resolve_impl

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert resolve_impl(None, torch.zeros(3, dtype=dtype)) == "cpp"
    assert resolve_impl(None, torch.zeros(3, dtype=torch.float64)) == "torch"
    assert resolve_impl(None, torch.zeros(3, device="meta")) == "torch"
    assert resolve_impl("torch", torch.zeros(3)) == "torch"
    assert resolve_impl("triton", torch.zeros(3)) == "triton"


# ---------------------------------------------------------------- many tensors in one call

# One call's tensors: every dtype, layouts of several unit sizes (the scratch is sized for the
# largest), sizes above and below the one-thread grain (so a parallel region shares units of
# several tensors), an empty tensor, a float64 one (the torch path, inside the same call), a
# transposed one, release and weight decay in some.
MULTI = [
    (SHAPES[11], FLAGS[0], torch.float32),
    (SHAPES[4], FLAGS[1], torch.bfloat16),
    (SHAPES[0], FLAGS[0], torch.float32),
    (SHAPES[8], FLAGS[5], torch.float16),
    (SHAPES[9], FLAGS[4], torch.float32),
    (SHAPES[2], FLAGS[3], torch.float64),
    (Shape("big", (70000,), 4096, 0.01, 128, 10), FLAGS[5], torch.float32),
    (Shape("big-bf16", (40000,), 1024, 0.02, 64, 3), FLAGS[0], torch.bfloat16),
]


def _multi_items(gen: torch.Generator) -> list[dict]:
    items = []
    for i, (shape, flags, dtype) in enumerate(MULTI):
        lay = shape.layout()
        hyper = dict(
            layout=lay, lr=1e-2, beta1=0.9, beta2=0.999, eps=flags.eps, weight_decay=flags.weight_decay,
            error_rounding=flags.error_rounding, stochastic_param_rounding=flags.stochastic_param_rounding,
            seed=5, param_index=i, position_offset=flags.position_offset,
        )  # fmt: skip
        if flags.release:
            hyper.update(release=flags.release, release_scale=flags.release_scale)
        items.append(dict(param=make_tensor(shape, dtype, gen, shape.transposed), **new_state(lay), **hyper))
    return items


def test_many_tensors_in_one_call_equal_the_torch_path() -> None:
    gen = torch.Generator().manual_seed(3)
    items = _multi_items(gen)
    ref = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in it.items()} for it in items]
    for step in range(1, 13):  # past the largest window: every ring wraps
        grads = [make_grad(shape, flags, it["param"].dtype, gen) for (shape, flags, _), it in zip(MULTI, items)]
        for r, g in zip(ref, grads):
            functional.microadam_step(
                r["param"], g, step=step, impl="torch", **{k: v for k, v in r.items() if k != "param"}
            )
        calls = [dict(it, grad=g.clone(), step=step) for it, g in zip(items, grads)]
        # Through the registry, both ways the package offers: one call, or its two phases.
        if step % 2:
            load_multi("cpp")(calls)
        else:
            prepare, run = load_phases("cpp")
            run(prepare(calls))
        for (shape, _, _), it, r in zip(MULTI, items, ref):
            for name in ("param", *new_state(shape.layout())):
                assert_bits_equal(it[name], r[name], f"{shape.id} {name} after step {step}")


def test_many_tensors_are_all_checked_before_any_is_stepped() -> None:
    gen = torch.Generator().manual_seed(4)
    items = _multi_items(gen)
    before = [{k: v.clone() for k, v in it.items() if isinstance(v, torch.Tensor)} for it in items]
    calls = [dict(it, grad=torch.randn(it["param"].shape, generator=gen).to(it["param"].dtype), step=1) for it in items]
    calls[-1]["error_rounding"] = "up"  # the last tensor's argument is bad
    with pytest.raises(ValueError, match="error_rounding"):
        cpu.microadam_step_cpp_multi(calls)
    for it, b in zip(items, before):
        for name, t in b.items():
            assert torch.equal(it[name], t), f"{name} changed although the call was refused"


def test_corrupt_state_in_a_batch_names_the_tensor() -> None:
    a, b = _small_args(100), _small_args(100)
    b["window_indices"][0, 1, 0] = 60  # block 1 holds 36 elements
    with pytest.raises(RuntimeError, match=r"tensor\(s\) \[1\].*corrupt"):
        cpu.microadam_step_cpp_multi(
            [dict(a, param=torch.zeros(100), grad=torch.randn(100), step=2),
             dict(b, param=torch.zeros(100), grad=torch.randn(100), step=2)]
        )  # fmt: skip
    run_both(SHAPES[8], FLAGS[0], torch.float32, steps=3)


def test_optimizer_steps_cpu_tensors_in_one_call(monkeypatch) -> None:
    calls = []
    real = cpu._step_all
    monkeypatch.setattr(cpu, "_step_all", lambda pending: (calls.append(len(pending)), real(pending)))
    params = [torch.nn.Parameter(torch.randn(n)) for n in (10, 300, 5000)]
    for p in params:
        p.grad = torch.randn(p.shape)
    MicroAdam(params, lr=1e-3, impl="cpp").step()
    assert calls == [3]


@pytest.mark.parametrize("build", ["native", "portable", "x86-64-v3"])
def test_kth_largest_matches_a_sort(tmp_path, build: str) -> None:
    """The radix select of the k-th Top-K key, alone, against a sort on 100k random key sets (the step
    tests reach it only with the candidate sets their gradients happen to give), in each build's loops:
    AVX-512 here, the AVX2 ones (x86-64-v3) and the plain ones (portable)."""
    march = {"native": list(cpu._NATIVE), "portable": [], "x86-64-v3": ["-march=x86-64-v3"]}[build]
    if build == "x86-64-v3" and not _cpu_has("avx2"):
        pytest.skip("this CPU has no AVX2: the x86-64-v3 build cannot run here")
    compiler = cpu.shutil.which(cpu._COMPILER)
    assert compiler is not None, "the tests need g++"
    check = Path(__file__).parent / "csrc" / "kth_largest_check.cpp"
    main = tmp_path / "main.cpp"
    main.write_text(f'#include "{cpu._SOURCE}"\n#include "{check}"\n')
    exe = tmp_path / "check"
    build_run = cpu._run([compiler, "-O2", "-std=c++17", "-fopenmp", *march, str(main), "-o", str(exe)])
    assert build_run.returncode == 0, build_run.stderr
    run = cpu._run([str(exe)])
    assert run.returncode == 0 and run.stdout.strip() == "0 wrong of 100000", run.stdout + run.stderr


def test_profile_build_counts_every_element(monkeypatch) -> None:
    """The phase counters (benchmarks/cpu_phases.py) see every element of a step, and time in each phase."""
    built = _build("profile")
    lib = built[0]
    monkeypatch.setattr(cpu, "_state", {"lib": built})
    counts = (cpu.ctypes.c_uint64 * (16 * 64))()
    lib.microadam_profile_read(counts, 64)
    p = torch.nn.Parameter(torch.randn(20000))
    p.grad = torch.randn(20000)
    MicroAdam([p], lr=1e-3, impl="cpp").step()
    lib.microadam_profile_read(counts, 64)
    rows = [counts[16 * t : 16 * t + 16] for t in range(64)]
    assert sum(r[15] for r in rows) == 20000
    assert all(sum(r[i] for r in rows) > 0 for i in range(7)), [sum(r[i] for r in rows) for i in range(7)]


def test_a_tensor_shorter_than_its_unit_is_one_unit() -> None:
    """A tensor smaller than block_size is one block of numel elements; where numel is neither a multiple
    nor a divisor of quant_block, lcm(block, quant_block, 2) was thousands of times numel (4095
    elements: 524160), and every thread's scratch was sized to it and kept (8 MB a thread; block and
    quant_block 32768 with 32767 elements asked for 18 GB and aborted the process)."""
    for n, q in ((4095, 128), (4095, 4096), (32767, 32768), (7, 4)):
        lay = layout_for(n, block_size=max(q, 4096), density=0.01, quant_block_size=q, window=2)
        assert cpu._layout_facts(lay)[1] == n + n % 2
    lay = layout_for(8192, block_size=4096, density=0.01, quant_block_size=128, window=2)
    assert cpu._layout_facts(lay)[1] == 4096  # tensors of whole units keep lcm(block, quant_block, 2)


_SCRATCH_FAILS = r"""
import resource, sys
import torch
from microadam.functional import microadam_step, zero_state
from microadam.layout import layout_for
torch.set_num_threads(int(sys.argv[1]))
def step(p, g, state, lay):
    microadam_step(p, g, **state, layout=lay, step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                   weight_decay=0.0, error_rounding="nearest", stochastic_param_rounding=False, seed=0,
                   param_index=0, impl="cpp")
small = layout_for(2**17, block_size=4096, density=0.01, quant_block_size=128, window=2)
p = torch.zeros(small.numel)
step(p, torch.randn(small.numel), zero_state(small, "cpu"), small)  # builds, starts the threads
# Sizes neither of which divides the other (the functional API takes them): one unit of 2**25
# elements, about 170 MB of scratch a thread.
lay = layout_for(2**25, block_size=32767, density=0.01, quant_block_size=32768, window=2)
p, g, state = torch.zeros(lay.numel), torch.randn(lay.numel), zero_state(lay, "cpu")
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (vm + 64 * 2**20, hard))
try:
    step(p, g, state, lay)
except MemoryError as e:
    print("MemoryError:", e)
resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
print("untouched", not p.any() and not any(t.any() for t in state.values()))
step(p, g, state, lay)
print("stepped", bool(p.any() and state["error_codes"].any()))
"""


# threads=2 in CI's slow pass (11 s): the default suite took 626 s of its 600 on 2 cores (2026-12-01).
@pytest.mark.parametrize("threads", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_scratch_that_cannot_be_allocated_fails_the_call_with_nothing_written(tmp_path, threads: int) -> None:
    """std::bad_alloc in a thread's scratch escaped the C function (an abort of the process); now every
    thread reserves before any unit is stepped and the call raises MemoryError having written nothing."""
    script = tmp_path / "scratch_fails.py"
    script.write_text(_SCRATCH_FAILS)
    run = subprocess.run([sys.executable, str(script), str(threads)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "MemoryError: impl='cpp' could not allocate its per-thread scratch" in run.stdout, run.stdout
    assert "nothing was written" in run.stdout
    assert "untouched True" in run.stdout and "stepped True" in run.stdout


# Each entry changes one input of the next step (i = 0..3, before step i + 1) on the tensors the C++
# path keeps stepping: a hyperparameter, a tensor's dtype at the same address, a tensor replaced by a
# copy at another address, a non-contiguous state, another layout. The C++ rows are built from parts
# cached per tensor and per step (cpu._static, cpu._step_part), so each must reach the kernel.
def _same_address_fp16(i: int, a: dict) -> None:
    if i == 2:
        a["param"] = a["param"].view(torch.float16)  # bf16 bits as float16: |x| < 2 stays finite


def _clone_states(i: int, a: dict) -> None:
    if i in (1, 3):
        a.update({name: a[name].clone() for name in functional.STATE_DTYPES})


def _non_contiguous_values(i: int, a: dict) -> None:
    if i == 2:
        a["window_values"] = a["window_values"].transpose(0, 2).contiguous().transpose(0, 2)
        assert not a["window_values"].is_contiguous()


def _other_layout(i: int, a: dict) -> None:
    if i == 2:
        lay = layout_for(300, block_size=64, density=0.1, quant_block_size=32, window=2)
        a.update(new_state(lay), layout=lay)


def _values(name: str, values: list) -> Callable[[int, dict], None]:
    return lambda i, a: a.update({name: values[i]})


GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
CHANGES = {
    "lr": _values("lr", [1e-2, -0.0, 0.0, 2e-2]),
    "eps": _values("eps", [1e-8, 1e-3, 0.0, 1e-8]),
    "weight_decay": _values("weight_decay", [0.0, 0.1, 0.0, 0.1]),
    "error_rounding": _values("error_rounding", ["nearest", "stochastic", "nearest", "stochastic"]),
    "stochastic_param_rounding": _values("stochastic_param_rounding", [True, False, True, False]),
    "release": _values("release", [0.0, 0.5, 0.0, 0.25]),
    "release_scale": lambda i, a: a.update(release=0.5, release_scale=[1.0, 0.5, -0.0, 2.0][i]),
    "position_offset": _values("position_offset", [0, 64, 0, 7]),
    "seed": lambda i, a: a.update(error_rounding="stochastic", seed=[0, 1, 0, 2][i]),
    "param_index": lambda i, a: a.update(error_rounding="stochastic", param_index=[0, 5, 0, 9][i]),
    "grad_dtype": lambda i, a: a.update(grad=a["grad"].to(GRAD_DTYPES[i])),
    "param_dtype_same_address": _same_address_fp16,
    "param_copy": lambda i, a: a.update(param=a["param"].clone()) if i else None,
    "state_copies": _clone_states,
    "non_contiguous_state": _non_contiguous_values,
    "layout": _other_layout,
}  # fmt: skip


@pytest.mark.parametrize("change", CHANGES)
def test_a_change_between_steps_reaches_the_kernel(change: str) -> None:
    gen = torch.Generator().manual_seed(zlib.crc32(change.encode()))
    lay = layout_for(300, block_size=64, density=0.05, quant_block_size=16, window=3)
    param = torch.randn(300, generator=gen).to(torch.bfloat16)
    param[::7] = 0.0  # zeros, whose sign shows a zero lr's sign
    args = dict(new_state(lay), layout=lay, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    args.update(error_rounding="nearest", stochastic_param_rounding=True, seed=0, param_index=0, param=param)
    for i in range(4):
        args.update(step=i + 1, grad=torch.randn(300, generator=gen))
        CHANGES[change](i, args)
        # The torch path steps copies of the same inputs: one step's results must be equal bit for bit.
        copies = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        functional.microadam_step(impl="torch", **copies)
        functional.microadam_step(impl="cpp", **args)
        for name in ("param", *functional.STATE_DTYPES):
            assert_bits_equal(args[name], copies[name], f"{name} after step {i + 1} ({change})")


def test_a_state_of_another_shape_or_dtype_at_the_same_address_is_refused() -> None:
    """The cached row of a tensor is looked up by its state's addresses, dtypes and shapes: a view of
    another shape or dtype at the same address is checked again, and refused before anything is written."""
    args = _small_args(100)
    param, grad = torch.randn(100), torch.randn(100)
    cpu.microadam_step_cpp(param, grad, **args)
    wi = args["window_indices"]
    # Another shape, and another dtype (uint8 over the first half of its bytes) of the same shape.
    same_shape = torch.empty(0, dtype=torch.uint8).set_(wi.untyped_storage(), 0, wi.shape, wi.stride())
    for bad in (wi.view(wi.shape[0], -1, 1), same_shape):
        assert bad.data_ptr() == wi.data_ptr()
        before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
        saved = param.clone()
        with pytest.raises(ValueError, match="window_indices must be torch.int16 of shape"):
            cpu.microadam_step_cpp(param, grad, **dict(args, window_indices=bad, step=2))
        assert torch.equal(param, saved) and all(torch.equal(args[k], v) for k, v in before.items())


def test_scalars_of_other_types_reach_the_kernel_by_value() -> None:
    """The step's shared fields are cached by value: a tensor lr changed in place must not keep its old
    row, a NumPy lr must work, and beta2 = -0.0 must be refused after +0.0 was cached."""
    import numpy as np

    lr = torch.tensor(1e-2)
    p_cpp = torch.randn(100)
    p_torch = p_cpp.clone()
    s_cpp, s_torch = _small_args(100), _small_args(100)
    for step, value in enumerate([1e-2, 1.0, 0.5], start=1):
        lr.fill_(value)
        g = torch.randn(100)
        cpu.microadam_step_cpp(p_cpp, g, **dict(s_cpp, lr=lr, step=step))
        functional.microadam_step(p_torch, g, **dict(s_torch, lr=value, step=step), impl="torch")
        assert_bits_equal(p_cpp, p_torch, f"parameter after step {step} (lr {value})")
    cpu.microadam_step_cpp(torch.randn(100), torch.randn(100), **dict(_small_args(100), lr=np.array(1e-2)))
    cpu.microadam_step_cpp(torch.randn(100), torch.randn(100), **_small_args(100, beta2=0.0))
    with pytest.raises(ValueError, match=r"needs beta2 >= \+0"):
        cpu.microadam_step_cpp(torch.randn(100), torch.randn(100), **_small_args(100, beta2=-0.0))
