"""Randomized differential test of the three implementations through the optimizer (a seeded fuzz).

tests/test_cpu_kernel.py and tests/test_triton_kernels.py compare each fast path with the torch path
on a fixed table of layouts, one hyperparameter set per run. Here each seed draws a whole training
run and drives it through ``MicroAdam(impl="torch")``, ``impl="cpp"`` and ``impl="triton"`` (under
``TRITON_INTERPRET=1``) in lockstep: several param groups with their own layouts and hyperparameters
(both variants, release and release_scale values, weight decay, both error roundings, stochastic
rounding on and off, eps 0, beta 0), tensors of fp32 / bf16 / fp16 whose sizes sit around the block
sizes (1, primes, a block plus or minus one, fewer elements than k, 0-d, empty, transposed), more
steps than the window (the ring wraps), and between steps: learning rate changes, edits of other
hyperparameters in ``param_groups``, ``reconfigure(density=, window=)``, a ``state_dict`` round trip
through ``torch.save``/``torch.load(weights_only=True)`` into the same or a new optimizer, steps skipped
for a NaN or Inf gradient, parameters without a gradient (tensors of one launch at different step
counts), zero, signed-zero, tiny (1e-30), subnormal (down to a few units of the smallest one), huge
(1e30), mixed-magnitude, tied and sparse gradients.

What must hold after every step (``docs/algorithm.md``):
- cpp equals torch bit for bit: every parameter and every state tensor, step counters, skipped steps;
- triton's state equals the torch path's bit for bit, and its parameters too once the torch path
  runs with a correctly rounded ``Tensor.sqrt`` (as in tests/test_triton_kernels.py), except a
  bf16/fp16 parameter under release: bit-equal outside the window's positions and within two
  roundings at them. For that comparison the torch path starts each step from triton's parameters.

The fast list (8 seeds) runs in about 40 s on 2 CPU cores; ``slow`` runs 33 more (about two minutes). A longer
search: ``run_case(draw_case(seed), triton=True)`` over more seeds.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import warnings  # noqa: E402
from typing import Any  # noqa: E402
from unittest import mock  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from microadam import MicroAdam  # noqa: E402
from microadam.kernels import availability  # noqa: E402

# Bit-equality with the torch path is a CPU claim: the kernels are compared under the interpreter only.
_TRITON = os.environ["TRITON_INTERPRET"] not in ("", "0") and availability("triton")[0]

_INT_VIEW = {
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float64: torch.int64,
    torch.int16: torch.int16,
    torch.uint8: torch.uint8,
}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

_torch_sqrt = torch.Tensor.sqrt


def _rn_sqrt(x: torch.Tensor) -> torch.Tensor:
    # float64 holds more than twice float32's precision: its square root rounded to float32 is correctly rounded.
    return _torch_sqrt(x.double()).to(x.dtype) if x.dtype == torch.float32 else _torch_sqrt(x)


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    return t.view(_INT_VIEW[t.dtype])


def _differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Where the bit patterns of ``a`` and ``b`` differ, NaN against NaN aside: the paths' NaNs are not
    one bit pattern (a bf16 NaN is 0xFFFF, 0x7FC0 or 0xFFC0 by path), and a run stops at its first NaN."""
    differ = (_bits(a) != _bits(b)).reshape(-1)
    if a.is_floating_point():
        differ &= ~(torch.isnan(a.detach()) & torch.isnan(b.detach())).reshape(-1)
    return differ


# ---------------------------------------------------------------- drawing a run


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str
    transposed: bool


@dataclasses.dataclass
class Case:
    seed: int
    groups: list[dict[str, Any]]
    tensors: list[list[TensorSpec]]
    steps: int


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _pow2(x: int) -> bool:
    return x & (x - 1) == 0


def _group(r: random.Random) -> dict[str, Any]:
    B = r.choice([1, 2, 3, 4, 5, 7, 8, 12, 15, 16, 17, 24, 31, 32, 48, 64, 100, 128])
    q = r.choice([d for d in _divisors(B) if d <= 256] + [B * m for m in (2, 3, 4, 8) if B * m <= 256])
    if q > B and not (_pow2(q) and _pow2(B) and B >= 2):
        # Refused for impl="triton" under release (test_optimizer.py checks the message): mostly drawn as paper.
        variant = "paper" if r.random() < 0.8 else "release"
    else:
        variant = r.choice(["paper", "release", "release"])
    g: dict[str, Any] = dict(
        block_size=B,
        quant_block_size=q,
        density=r.choice([0.01, 0.05, 0.07, 0.1, 0.2, 0.25, 1 / 3, 0.5, 0.9, 1.0, round(r.uniform(0.001, 1.0), 4)]),
        window=r.choice([1, 2, 3, 3, 4, 5]),
        variant=variant,
        lr=r.choice([1e-2, 1e-3, 3e-2, 0.1, 1e-4, 0.0]),
        weight_decay=r.choice([0.0, 0.0, 0.01, 0.1, 0.5]),
        betas=r.choice([(0.9, 0.999), (0.9, 0.999), (0.5, 0.9), (0.0, 0.99), (0.9, 0.0)]),
        eps=r.choice([1e-8, 1e-8, 0.0, 1e-3]),
        error_rounding=r.choice(["nearest", "stochastic"]),
        stochastic_rounding=r.choice([True, False]),
        seed=r.choice([0, 12345, 2**32 - 1, r.randrange(2**32)]),
        chunk_size=r.choice([2**20, 2**20, 16, 45]),  # the torch path's chunks; the fast paths ignore it
    )
    if variant == "release":
        release = r.choice([None, 0.5, 1.0, 0.25, 0.0, round(r.uniform(0.01, 1.0), 3)])
        scale = r.choice([None, 1.0, 0.7, 2.0, 0.0])
        if release is not None:
            g["release"] = release
        if scale is not None:
            g["release_scale"] = scale
    return g


def _size(r: random.Random, g: dict[str, Any], cap: int) -> int:
    B, q = g["block_size"], g["quant_block_size"]
    k = max(1, min(B, math.ceil(round(B * g["density"], 9))))
    menu = [1, 2, 3, 5, 7, 13, 31, 61, B - 1, B, B + 1, 2 * B - 1, 2 * B + 1, 3 * B, q - 1, q + 1, 2 * q + 1, k - 1]
    menu = [n for n in menu if 1 <= n <= cap] or [cap]
    if r.random() < 0.25:
        menu = [n for n in menu if n > 40] or menu
    n = r.choice(menu)
    if r.random() < 0.1:
        n = r.randint(1, cap)
    return 0 if r.random() < 0.03 else n


def _shape(r: random.Random, n: int) -> tuple[tuple[int, ...], bool]:
    if n == 1 and r.random() < 0.3:
        return (), False
    divisors = [d for d in _divisors(n) if 1 < d < n]
    if divisors and r.random() < 0.35:
        a = r.choice(divisors)
        return (a, n // a), r.random() < 0.5
    return (n,), False


def draw_case(seed: int, budget: int = 300, max_steps: int = 12) -> Case:
    r = random.Random(seed)
    groups, tensors = [], []
    ngroups = r.choice([1, 2, 2, 3])
    for _ in range(ngroups):
        g = _group(r)
        groups.append(g)
        specs = []
        for _ in range(r.choice([1, 1, 2, 3])):
            shape, transposed = _shape(r, _size(r, g, max(1, budget // (2 * ngroups))))
            dtype = r.choices(["fp32", "bf16", "fp16"], weights=[45, 30, 25])[0]
            specs.append(TensorSpec(shape, dtype, transposed))
        tensors.append(specs)
    steps = min(2 * max(g["window"] for g in groups) + r.randint(1, 4), max_steps)
    return Case(seed, groups, tensors, steps)


_GRAD_KINDS = [
    "normal", "scaled", "zeros", "negzeros", "tiny", "subnormal", "denorm", "huge", "mixed", "ties", "sparse", "none"
]  # fmt: skip
_GRAD_WEIGHTS = [30, 10, 4, 3, 4, 4, 6, 4, 8, 6, 6, 6]


def _grad(kind: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    n = math.prod(shape)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    fp16 = dtype == torch.float16
    if kind == "scaled":
        x = x * 10.0 ** int(torch.randint(-8, 9, (1,), generator=gen))
    elif kind == "zeros":
        x = torch.zeros_like(x)
    elif kind == "negzeros":
        x = torch.where(x > 0, 0.0, -0.0).to(torch.float64)
    elif kind == "tiny":
        x = x * 1e-30
    elif kind == "subnormal":
        x = x * (1e-6 if fp16 else 1e-40)
    elif kind == "denorm":
        # A few units of the smallest subnormal (of the gradient's dtype), sometimes beside normal values:
        # release halves them to signed zeros, whose min and max every path must store alike.
        unit = {torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133}.get(dtype, 2.0**-149)
        tiny = torch.randint(-3, 4, (n,), generator=gen).to(torch.float64) * unit
        x = torch.where(torch.rand(n, generator=gen) < 0.1, x, tiny) if torch.rand((), generator=gen) < 0.5 else tiny
    elif kind == "huge":
        x = x * (1e4 if fp16 else 1e30)  # fp16 overflows to inf now and then: a skipped step
    elif kind == "mixed":
        mags = (
            [1e-7, 1e-5, 1e-3, 1.0, 10.0, 1e3, 3e4] if fp16 else [1e-38, 1e-30, 1e-12, 1e-3, 1.0, 1e3, 1e12, 1e30, 1e36]
        )
        x = x * torch.tensor(mags, dtype=torch.float64)[torch.randint(0, len(mags), (n,), generator=gen)]
    elif kind == "ties":
        x = (x * 2).round() * 0.25
    elif kind == "sparse":
        x = x * (torch.rand(n, generator=gen, dtype=torch.float64) < 0.05)
    g = x.to(dtype).view(shape)
    if len(shape) == 2 and torch.rand((), generator=gen) < 0.2:
        g = g.t().contiguous().t()  # a non-contiguous gradient
    return g


def _events(r: random.Random, groups: int, tensors: int, step: int) -> dict[str, Any]:
    # The first step's gradient meets an empty error feedback: its values reach the quantizer as they are,
    # so the smallest subnormals are drawn more often there.
    weights = [w * 5 if kind == "denorm" and step == 1 else w for kind, w in zip(_GRAD_KINDS, _GRAD_WEIGHTS)]
    ev: dict[str, Any] = dict(
        kinds=r.choices(_GRAD_KINDS, weights=weights, k=tensors), grad_seed=r.randrange(2**31), actions=[]
    )
    if tensors and r.random() < 0.07:
        ev["nonfinite"] = (r.randrange(tensors), r.choice(["nan", "inf", "-inf"]))
    if r.random() < 0.15:
        ev["actions"].append(("lr", r.randrange(groups), r.choice([1e-2, 3e-3, 1e-4, 0.0, 0.05])))
    if r.random() < 0.06:
        key, value = r.choice(
            [
                ("weight_decay", r.choice([0.0, 0.1])),
                ("release_scale", r.choice([0.5, 2.0])),
                ("betas", (0.8, 0.99)),
                ("eps", r.choice([1e-8, 0.0])),
                ("error_rounding", r.choice(["nearest", "stochastic"])),
                ("stochastic_rounding", r.choice([True, False])),
            ]
        )
        ev["actions"].append(("edit", r.randrange(groups), key, value))
    if step > 1 and r.random() < 0.1:
        kw: dict[str, Any] = {}
        if r.random() < 0.7:
            kw["density"] = r.choice([0.01, 0.05, 0.1, 0.2, 0.5, 1.0])
        if r.random() < 0.6 or not kw:
            kw["window"] = r.choice([1, 2, 3, 5, 8])
        if groups > 1 and r.random() < 0.5:
            kw["groups"] = [r.randrange(groups)]
        ev["actions"].append(("reconfigure", kw))
    if step > 1 and r.random() < 0.1:
        ev["actions"].append(("saveload", r.choice(["fresh", "same"])))
    return ev


# ---------------------------------------------------------------- running a run on every path


@dataclasses.dataclass
class Run:
    impl: str  # "torch", "cpp", "torch_rn" (torch with a correctly rounded sqrt) or "triton"
    params: list[torch.nn.Parameter]
    opt: MicroAdam


def _clone(t: torch.Tensor) -> torch.Tensor:
    return t.t().clone().t() if t.dim() == 2 and not t.is_contiguous() else t.clone()


def _build(impl: str, params: list[torch.nn.Parameter], case: Case, groups: list[dict[str, Any]]) -> MicroAdam:
    out, i = [], 0
    for g, specs in zip(groups, case.tensors):
        out.append(dict(g, params=params[i : i + len(specs)]))
        i += len(specs)
    return MicroAdam(out, lr=1e-3, impl="torch" if impl == "torch_rn" else impl)


def _act(run: Run, action: tuple[Any, ...], case: Case) -> None:
    if action[0] == "lr":
        run.opt.param_groups[action[1]]["lr"] = action[2]
    elif action[0] == "edit":
        run.opt.param_groups[action[1]][action[2]] = action[3]
    elif action[0] == "reconfigure":
        run.opt.reconfigure(**action[1])
    else:
        buf = io.BytesIO()
        torch.save(run.opt.state_dict(), buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
        if action[1] == "fresh":
            groups = [{k: v for k, v in g.items() if k != "params"} for g in run.opt.param_groups]
            run.opt = _build(run.impl, run.params, case, groups)  # skipped_steps comes with the state dict
        run.opt.load_state_dict(saved)


def _step(run: Run, grads: list[torch.Tensor | None]) -> None:
    for p, g in zip(run.params, grads):
        p.grad = None if g is None else _clone(g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the skipped-step warning
        if run.impl == "torch_rn":
            with mock.patch.object(torch.Tensor, "sqrt", _rn_sqrt):
                run.opt.step()
        else:
            run.opt.step()


def _assert_states_equal(a: Run, b: Run, where: str) -> None:
    assert a.opt.skipped_steps == b.opt.skipped_steps, f"{where}: skipped_steps"
    for i, (pa, pb) in enumerate(zip(a.params, b.params)):
        sa, sb = a.opt.state.get(pa, {}), b.opt.state.get(pb, {})
        assert set(sa) == set(sb), f"{where}: tensor {i} state keys {sorted(sa)} vs {sorted(sb)}"
        for key, va in sa.items():
            vb = sb[key]
            if isinstance(va, torch.Tensor):
                ok = va.dtype == vb.dtype and va.shape == vb.shape and not bool(_differ(va, vb).any())
                assert ok, f"{where}: tensor {i} {key} differs between {a.impl} and {b.impl}"
            else:
                assert va == vb, f"{where}: tensor {i} {key}: {a.impl} {va!r}, {b.impl} {vb!r}"


def _assert_params_equal(a: Run, b: Run, where: str, skip: frozenset[int] = frozenset()) -> None:
    for i, (pa, pb) in enumerate(zip(a.params, b.params)):
        if i in skip:
            continue
        differ = _differ(pa, pb).nonzero().flatten()
        assert differ.numel() == 0, (
            f"{where}: parameter {i} ({pa.dtype}, shape {tuple(pa.shape)}) differs between {a.impl} and {b.impl} "
            f"at {differ[:5].tolist()}: {pa.detach().reshape(-1)[differ[:3]].tolist()} vs "
            f"{pb.detach().reshape(-1)[differ[:3]].tolist()}"
        )


def _group_of(opt: MicroAdam, p: torch.Tensor) -> dict[str, Any]:
    return next(g for g in opt.param_groups if any(q is p for q in g["params"]))


def _assert_triton_params(rn: Run, tr: Run, before: list[torch.Tensor], stepped: list[bool], where: str) -> None:
    """Bit-equal, except a stepped bf16/fp16 parameter under release: bit-equal outside the window's
    positions, and at them within the two roundings the kernels make (docs/algorithm.md)."""
    rounded_twice = set()
    for i, (pr, pt) in enumerate(zip(rn.params, tr.params)):
        group, st = _group_of(tr.opt, pt), tr.opt.state.get(pt)
        if not (stepped[i] and group["release"] and pt.dtype != torch.float32 and st and pt.numel()):
            continue
        rounded_twice.add(i)
        lay = MicroAdam.layout(pt, group)
        in_window = torch.zeros(pt.numel(), dtype=torch.bool)
        blocks = torch.arange(lay.num_blocks)[None, :, None] * lay.block
        in_window[(st["window_indices"].long() + blocks)[st["window_values"] != 0]] = True
        differ = _differ(pt, pr)
        outside = (differ & ~in_window).nonzero().flatten()
        assert outside.numel() == 0, f"{where}: parameter {i} differs outside the window at {outside[:5].tolist()}"
        got, want = pt.detach().reshape(-1).double(), pr.detach().reshape(-1).double()
        assert bool((torch.isfinite(got) | ~differ).all()), f"{where}: parameter {i}: non-finite difference"
        # |p * decay - lr * move| bounds the intermediate value the kernels round: |move| <= release_scale *
        # sqrt(q) (one element of a block of q carries at most all of its sum of squares).
        eps = torch.finfo(pt.dtype).eps
        decay = abs(1 - group["lr"] * group["weight_decay"])
        middle = (
            before[i].reshape(-1).double().abs() * decay + group["lr"] * group["release_scale"] * lay.quant_block**0.5
        )
        bound = eps * (got.abs() + want.abs() + middle) * (1 + 2**-20) + 3 * eps * torch.finfo(pt.dtype).tiny
        excess = torch.where(differ, (got - want).abs() - bound, 0.0)
        j = int(excess.argmax()) if excess.numel() else 0
        assert excess.numel() == 0 or excess[j] <= 0, (
            f"{where}: parameter {i} off by more than two roundings at {j}: triton {got[j].item()!r}, "
            f"torch {want[j].item()!r}, bound {bound[j].item():.3g}"
        )
    _assert_params_equal(rn, tr, where, skip=frozenset(rounded_twice))


def run_case(case: Case, triton: bool) -> None:
    gen = torch.Generator().manual_seed(case.seed)
    init = []
    for specs in case.tensors:
        for s in specs:
            t = torch.randn(s.shape[::-1] if s.transposed else s.shape, generator=gen, dtype=torch.float64)
            t = t.to(_DTYPES[s.dtype])
            init.append(t.t() if s.transposed else t)
    impls = ["torch", "cpp", "torch_rn"]
    runs: dict[str, Run] = {}
    for impl in impls:
        params = [torch.nn.Parameter(_clone(t)) for t in init]
        runs[impl] = Run(impl, params, _build(impl, params, case, case.groups))
    if triton:
        params = [torch.nn.Parameter(_clone(t)) for t in init]
        try:
            runs["triton"] = Run("triton", params, _build("triton", params, case, case.groups))
        except ValueError as e:
            # The one layout the optimizer refuses for the kernels (tests/test_optimizer.py checks it).
            assert "impl='triton'" in str(e) and "release" in str(e), str(e)
    r = random.Random(case.seed * 7919 + 1)
    for step in range(1, case.steps + 1):
        where = f"seed {case.seed}, step {step}"
        ev = _events(r, len(case.groups), len(init), step)
        for action in ev["actions"]:
            for run in runs.values():
                _act(run, action, case)
        g_gen = torch.Generator().manual_seed(ev["grad_seed"])
        grads = [_grad(kind, tuple(p.shape), p.dtype, g_gen) for kind, p in zip(ev["kinds"], init)]
        if "nonfinite" in ev:
            i, value = ev["nonfinite"]
            if grads[i] is not None and grads[i].numel():
                grads[i] = grads[i].contiguous().clone()
                grads[i].view(-1)[0] = float(value)
        if "triton" in runs:  # the torch path starts each step from the kernels' parameters
            with torch.no_grad():
                for pr, pt in zip(runs["torch_rn"].params, runs["triton"].params):
                    pr.copy_(pt)
        before = [_clone(p.detach()) for p in runs["torch_rn"].params]
        for run in runs.values():
            _step(run, grads)
        _assert_states_equal(runs["torch"], runs["cpp"], where)
        _assert_params_equal(runs["torch"], runs["cpp"], where)
        if "triton" in runs:
            _assert_states_equal(runs["torch_rn"], runs["triton"], where)
            _assert_triton_params(runs["torch_rn"], runs["triton"], before, [g is not None for g in grads], where)
        if _has_nan(runs["torch"]):
            # Finite gradients can overflow into inf and NaN (u = M / eps with S = 0, or lr = 0 times an
            # infinite u): from there the paths' Top-K among NaNs and their NaN bits need not agree.
            return


def _has_nan(run: Run) -> bool:
    tensors = [*run.params, *(v for p in run.params for v in run.opt.state.get(p, {}).values())]
    return any(isinstance(t, torch.Tensor) and t.is_floating_point() and bool(t.isnan().any()) for t in tensors)


# Seed 23 found a bug of the code before f1a42f7 (a block's min or max of -0 and +0 stored as either
# zero, depending on the path's order of comparisons). Seed 2 (11 s, the longest) runs in the slow pass:
# the default suite took 500-530 s of its 600 on 2 cores.
FAST_SEEDS = [0, 1, *range(3, 8), 23]
# 33 more seeds run in CI's slow pass (about two minutes on 2 cores, outside the default suite's 10); a
# longer search runs run_case(draw_case(seed), triton=True) over more seeds (83 more passed when this was
# written).
SLOW_SEEDS = [2, *(s for s in range(8, 41) if s not in FAST_SEEDS)]


@pytest.mark.parametrize("seed", FAST_SEEDS)
def test_paths_agree_on_a_random_run(seed: int) -> None:
    run_case(draw_case(seed), triton=_TRITON)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SLOW_SEEDS)
def test_paths_agree_on_a_random_run_slow(seed: int) -> None:
    run_case(draw_case(seed, budget=600, max_steps=16), triton=_TRITON)
