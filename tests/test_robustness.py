"""State is never poisoned: corrupt checkpoints, failures mid-step, refused groups, degenerate settings."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import microadam.optimizer as optimizer_module
from microadam import MicroAdam, PartialStepError
from microadam.guard import Guard, GuardPolicy
from microadam.reference import ReferenceMicroAdam
from tests.common import LIMIT_PATTERNS, step_at_the_grad_limit

KW = dict(lr=1e-2, window=3, density=0.1, block_size=10, quant_block_size=5)


def _trained(n: int = 25, steps: int = 4):
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(n, generator=gen))
    b = torch.nn.Parameter(torch.randn(7, generator=gen))
    opt = MicroAdam([a, b], **KW)
    for _ in range(steps):
        a.grad, b.grad = torch.randn(n, generator=gen), torch.randn(7, generator=gen)
        opt.step()
    return (a, b), opt


@pytest.mark.parametrize(
    "corrupt,words",
    [
        (lambda st: st["window_indices"].__setitem__((0, 1, 0), -3), "outside their blocks"),
        (lambda st: st["window_indices"].__setitem__((0, 0, 0), 10), "outside their blocks"),
        (lambda st: st["window_indices"].__setitem__((0, 2, 0), 5), "outside their blocks"),  # last block has 5
        (lambda st: st["window_values"].__setitem__((0, 0, 0), float("nan")), "holds nan: NaN, Inf or a magnitude"),
        (lambda st: st["error_bounds"].__setitem__((0, 1), float("inf")), "holds inf: NaN, Inf or a magnitude"),
        # Finite, but beyond what a step leaves: the next step would turn parameters NaN.
        (lambda st: st["error_bounds"].__setitem__((0, 1), 3e38), "beyond 2\\*\\*120"),
        (lambda st: st["window_values"].__setitem__((0, 0, 0), -(2.0**121)), "holds -2.6.*beyond 2\\*\\*120"),
        (lambda st: st["error_bounds"].__setitem__((0, 0), 100.0), "lo > hi"),
        (lambda st: st.__setitem__("step", 3.5), "step of parameter 0 is 3.5; it must be an integer"),
        (lambda st: st.__setitem__("step", "x"), "step of parameter 0 is 'x'"),
        (lambda st: st.__setitem__("step", 2**70), "in \\[0, 2\\*\\*62\\]"),
    ],
    ids=[
        "negative-index",
        "index-past-block",
        "index-past-partial-block",
        "nan-value",
        "inf-bound",
        "huge-bound",
        "huge-value",
        "lo-above-hi",
        "fractional-step",
        "string-step",
        "huge-step",
    ],  # fmt: skip
)
def test_corrupt_state_values_are_refused_and_change_nothing(corrupt, words):
    (a, b), opt = _trained()
    sd = opt.state_dict()
    sd["state"][0] = {k: v.clone() if torch.is_tensor(v) else v for k, v in sd["state"][0].items()}
    corrupt(sd["state"][0])
    before = {k: v.clone() for k, v in opt.state[a].items() if torch.is_tensor(v)}
    with pytest.raises(ValueError, match=words):
        opt.load_state_dict(sd)
    assert all(torch.equal(before[k], opt.state[a][k]) for k in before)


def test_loaded_state_does_not_share_tensors_with_the_source():
    (a, b), opt = _trained()
    saved = {k: v.clone() for k, v in opt.state[a].items() if torch.is_tensor(v)}
    twin = [torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())]
    fresh = MicroAdam(twin, **KW)
    fresh.load_state_dict(opt.state_dict())
    for p in twin:
        p.grad = torch.randn_like(p)
    fresh.step()
    assert all(torch.equal(saved[k], opt.state[a][k]) for k in saved)


def test_a_failure_mid_step_does_not_advance_the_failing_parameter(monkeypatch):
    (a, b), opt = _trained()
    for group in opt.param_groups:
        group["impl"] = "torch"  # one call per tensor (the C++ path steps a batch in one call: below)
    real = optimizer_module.microadam_step
    calls = []

    def flaky(p, g, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated out of memory")
        return real(p, g, **kw)

    monkeypatch.setattr(optimizer_module, "microadam_step", flaky)
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    with pytest.raises(RuntimeError, match="simulated"):
        opt.step()
    # a was updated (documented: restore a checkpoint rather than retrying); b's counter did not move.
    assert opt.state[a]["step"] == 5 and opt.state[b]["step"] == 4


def test_a_corrupt_tensor_in_a_batched_step_counts_the_others():
    """impl="cpp" steps all CPU tensors in one call; a corrupt state found during it fails that
    tensor only: the others were stepped, and their counters say so."""
    (a, b), opt = _trained()
    for group in opt.param_groups:
        group["impl"] = "cpp"
    # b has 7 elements: one Top-K block of 7 (block_size 10); slot 0 is in the window at step 5.
    opt.state[b]["window_indices"][0, 0, 0] = 9
    a_before = a.detach().clone()
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    with pytest.raises(PartialStepError, match=r"parameter\(s\) \[1\].*corrupt") as raised:
        opt.step()
    assert raised.value.failed == [1]
    assert opt.state[a]["step"] == 5 and not torch.equal(a.detach(), a_before)
    assert opt.state[b]["step"] == 4


def test_a_corrupt_tensor_is_named_by_its_parameter_index_when_new_states_join():
    """New states join the many-tensor call after the existing ones, so positions in the call differ
    from parameter indices; the error names the parameter."""
    (a, b), opt = _trained()
    c = torch.nn.Parameter(torch.randn(9))
    opt.param_groups[0]["params"].insert(0, c)  # c: index 0, no state yet; a: 1, b: 2
    for group in opt.param_groups:
        group["impl"] = "cpp"
    opt.state[b]["window_indices"][0, 0, 0] = 9
    a_before = a.detach().clone()
    a.grad, b.grad, c.grad = torch.randn_like(a), torch.randn_like(b), torch.randn_like(c)
    with pytest.raises(PartialStepError, match=r"parameter\(s\) \[2\].*corrupt") as raised:
        opt.step()
    assert raised.value.failed == [2]
    assert opt.state[c]["step"] == 1 and opt.state[a]["step"] == 5 and opt.state[b]["step"] == 4
    assert not torch.equal(a.detach(), a_before)


def test_a_refused_param_group_leaves_no_trace():
    (a, b), opt = _trained()
    c = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="density"):
        opt.add_param_group(dict(params=[c], density=5.0))
    with pytest.raises(TypeError, match="complex"):
        opt.add_param_group(dict(params=[torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))]))
    assert len(opt.param_groups) == 1
    opt.add_param_group(dict(params=[c], density=0.5))
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["density"] == 0.5


@pytest.mark.parametrize("kwargs", [dict(seed=0.5), dict(lr=float("inf")), dict(eps=float("nan"))])
def test_bad_seed_or_nonfinite_hyperparameter_is_refused(kwargs):
    with pytest.raises((TypeError, ValueError)):
        MicroAdam([torch.nn.Parameter(torch.zeros(3))], **dict(KW, **kwargs))


def test_eps_zero_moves_nothing_it_should_not():
    """With eps = 0, positions whose window entries are all zero must not become 0/0 = NaN."""
    p = torch.nn.Parameter(torch.randn(25))
    ref_p = p.detach().clone()
    opt = MicroAdam([p], **dict(KW, eps=0.0))
    ref = ReferenceMicroAdam([ref_p], **dict(KW, eps=0.0), compute_dtype=torch.float32)
    g = torch.zeros(25)
    g[3] = 1.0  # one nonzero: the other selections are zeros
    for _ in range(3):
        p.grad = g.clone()
        opt.step()
        ref.step([g.clone()])
    assert torch.isfinite(p).all() and torch.isfinite(ref_p).all()
    torch.testing.assert_close(p.detach(), ref_p)


def test_guard_accepts_large_finite_fp16_gradients():
    lin = torch.nn.Linear(100, 1).half()
    opt = MicroAdam(lin.parameters(), lr=1e-3)
    guard = Guard(lin, opt, GuardPolicy())
    for p in lin.parameters():
        p.grad = torch.full_like(p, 1000.0)  # the fp16 sum overflows; the values are finite
    assert guard.step(torch.tensor(1.0)) is None
    assert all(s["step"] == 1 for s in opt.state.values())


@pytest.mark.parametrize("optimizer", ["microadam", "adamw"])
def test_guard_treats_a_gradient_beyond_the_limit_as_nonfinite(optimizer):
    """The Guard's gradient check is the optimizer's range check: a finite 3e38 is a "nonfinite" event and
    the step is not taken (for any optimizer the Guard wraps), while 2**96 (within the limit) goes ahead."""
    from microadam.optimizer import GRAD_LIMIT

    lin = torch.nn.Linear(10, 1)
    opt = MicroAdam(lin.parameters(), lr=1e-3) if optimizer == "microadam" else torch.optim.AdamW(lin.parameters())
    guard = Guard(lin, opt, GuardPolicy())
    kept = [p.detach().clone() for p in lin.parameters()]
    for p in lin.parameters():
        p.grad = torch.zeros_like(p)
    lin.weight.grad[0, 3] = 3e38
    event = guard.step(torch.tensor(1.0))
    assert event is not None and event.event == "nonfinite" and event.actions == ["skip"]
    assert event.seen["gradient"] == "weight holds 3e+38"  # the event log names it
    assert all(torch.equal(a, b) for a, b in zip(kept, lin.parameters()))
    assert not opt.state or all(int(st["step"]) == 0 for st in opt.state.values())
    lin.weight.grad[0, 3] = GRAD_LIMIT / 2**4  # its square overflows: that element's update is 0, taken
    assert guard.step(torch.tensor(1.0)) is None
    assert all(int(opt.state[p]["step"]) == 1 for p in lin.parameters())


def test_guard_names_a_parameter_outside_the_model_by_its_index_in_the_optimizer():
    """Parameters without a gradient still count: the fifth of the optimizer's is "optimizer parameter 4"."""
    lin = torch.nn.Linear(3, 1)
    extra = [torch.nn.Parameter(torch.randn(4)) for _ in range(3)]
    opt = MicroAdam([*lin.parameters(), *extra], lr=1e-3)
    guard = Guard(lin, opt, GuardPolicy())
    extra[2].grad = torch.full((4,), float("nan"))  # the others have no gradient
    event = guard.step(torch.tensor(1.0))
    assert event is not None and event.seen["gradient"] == "optimizer parameter 4 holds nan"


def test_guard_raises_each_group_density_from_its_own_value():
    a, b = torch.nn.Parameter(torch.randn(50)), torch.nn.Parameter(torch.randn(50))
    opt = MicroAdam([dict(params=[a], density=0.05), dict(params=[b], density=0.5)], **{**KW, "density": 0.1})
    guard = Guard(torch.nn.ParameterList([a, b]), opt, GuardPolicy(max_density=0.8))
    result = guard._relax("raise_density")
    assert opt.param_groups[0]["density"] == pytest.approx(0.1) and opt.param_groups[1]["density"] == 0.8
    assert result["group0_density"] == pytest.approx(0.1)


def test_fallback_moments_match_the_reference_window():
    """exp_avg = (1-b1)(M + e), exp_avg_sq = (1-b2)(S + e^2), built here from the reference's own state."""
    gen = torch.Generator().manual_seed(4)
    p = torch.nn.Parameter(torch.randn(40, dtype=torch.float64, generator=gen))
    shadow = p.detach().clone()
    opt = MicroAdam([p], **KW)
    ref = ReferenceMicroAdam([shadow], **KW)
    for _ in range(5):  # the 3-slot ring wraps
        g = torch.randn(40, dtype=torch.float64, generator=gen)
        p.grad = g.clone()
        opt.step()
        ref.step([g])
    st, (b1, b2) = ref.states[0], (0.9, 0.999)
    M, S = torch.zeros(40, dtype=torch.float64), torch.zeros(40, dtype=torch.float64)
    for age in range(3):
        idx, val = st.window[(st.step - 1 - age) % 3]
        for blk in range(idx.shape[0]):
            for j in range(idx.shape[1]):
                M[blk * 10 + idx[blk, j]] += b1**age * val[blk, j]
                S[blk * 10 + idx[blk, j]] += b2**age * val[blk, j] ** 2
    e = ref.dequantized_error(0)
    opt.fallback_to_adamw()
    torch.testing.assert_close(opt.state[p]["exp_avg"], (1 - b1) * (M + e))
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"], (1 - b2) * (S + e * e))


@pytest.mark.parametrize("variant", ["release", "paper"])
@pytest.mark.parametrize("pattern", LIMIT_PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_gradients_up_to_the_limit_leave_state_finite_and_beyond_it_are_skipped(impl, dtype, pattern, variant):
    """No finite gradient puts NaN or Inf into the state: up to GRAD_LIMIT the step's sums cannot
    overflow, beyond it the step is skipped (Triton's kernels: tests/test_triton_kernels.py)."""
    from microadam.kernels import cpu

    if impl == "cpp" and not cpu.available()[0]:
        pytest.skip("the C++ path does not build here")
    step_at_the_grad_limit(impl, dtype, pattern, variant)


def _dense_after_huge_gradient() -> tuple[torch.nn.Parameter, MicroAdam]:
    """A MicroAdam fallen back to dense AdamW, stepped once with a gradient of 2**80: within GRAD_LIMIT,
    but its square overflows float32, so exp_avg_sq holds +Inf (as torch's AdamW's would)."""
    (a, b), opt = _trained()
    opt.fallback_to_adamw()
    a.grad, b.grad = torch.full_like(a, 2.0**80), torch.randn(7)
    opt.step()
    assert opt.skipped_steps == 0 and torch.isinf(opt.state[a]["exp_avg_sq"]).all()
    return a, opt


def test_dense_state_with_an_infinite_second_moment_saves_loads_and_continues():
    """The dense fallback's exp_avg_sq = +Inf is what a step leaves (the update of those elements is
    then 0): a checkpoint holding it loads, and the loaded optimizer continues exactly as the original.
    The load refused it as a corrupt checkpoint."""
    a, opt = _dense_after_huge_gradient()
    assert torch.isfinite(a).all()
    (a2, b2), fresh = _trained()
    fresh.fallback_to_adamw()
    with torch.no_grad():
        a2.copy_(a)
        b2.copy_(opt.param_groups[0]["params"][1])
    fresh.load_state_dict(opt.state_dict())
    for p, q in ((a, a2), (opt.param_groups[0]["params"][1], b2)):
        g = torch.randn(p.shape)
        p.grad, q.grad = g, g.clone()
    opt.step()
    fresh.step()
    assert torch.equal(a, a2) and torch.isfinite(a2).all()


@pytest.mark.parametrize(
    "key,value,words",
    [("exp_avg", float("nan"), "holds nan"), ("exp_avg", float("inf"), "holds inf"),
     ("exp_avg_sq", float("nan"), "holds nan"), ("exp_avg_sq", -1.0, "holds -1.0"),
     ("exp_avg_sq", -float("inf"), "holds -inf")],
)  # fmt: skip
def test_a_dense_state_no_step_can_leave_is_refused(key, value, words):
    a, opt = _dense_after_huge_gradient()
    saved = copy.deepcopy(opt.state_dict())  # edited below: the entries are the optimizer's live ones
    saved["state"][0][key][3] = value
    kept = {k: v.clone() for k, v in opt.state[a].items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=f"'{key}' of parameter 0 {words}.*checkpoint is corrupt"):
        opt.load_state_dict(saved)
    assert all(torch.equal(v, opt.state[a][k]) for k, v in kept.items())


def _twins(impl: str):
    """Two optimizers on equal parameters after 4 equal steps, and the gradient source."""
    out = []
    for _ in range(2):
        (a, b), opt = _trained()
        for group in opt.param_groups:
            group["impl"] = impl
        out.append(((a, b), opt))
    return out


def _assert_same(one, other) -> None:
    (params, opt), (twin_params, twin) = one, other
    for p, q in zip(params, twin_params):
        assert torch.equal(p.detach(), q.detach())
        assert opt.state[p]["step"] == twin.state[q]["step"]
        for key, value in opt.state[p].items():
            if torch.is_tensor(value):
                assert torch.equal(value, twin.state[q][key]), key


@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_an_interrupt_during_the_writes_waits_for_the_step_to_end(monkeypatch, impl):
    """A Ctrl-C (SIGINT) that arrives while a step writes is delivered when the step has ended, every
    tensor written and counted: raised at once it left the counts behind the state (the next step
    then wrote the same ring slot again)."""
    import os
    import signal

    one, other = _twins(impl)
    gen = torch.Generator().manual_seed(7)
    grads = [torch.randn(25, generator=gen), torch.randn(7, generator=gen)]
    if impl == "cpp":
        from microadam.kernels import cpu

        real = cpu._step_all

        def interrupted(pending):
            real(pending)
            os.kill(os.getpid(), signal.SIGINT)  # lands just after the C++ call has written
            return None

        monkeypatch.setattr(cpu, "_step_all", interrupted)
    else:
        real = optimizer_module.microadam_step
        sent = []

        def interrupted(p, g, **kw):
            real(p, g, **kw)
            if not sent:  # once: the same signal twice is delivered at once (below)
                sent.append(os.kill(os.getpid(), signal.SIGINT))
            return None

        monkeypatch.setattr(optimizer_module, "microadam_step", interrupted)
    for p, g in zip(one[0], grads):
        p.grad = g.clone()
    with pytest.raises(KeyboardInterrupt):
        one[1].step()
    monkeypatch.undo()
    for p, g in zip(other[0], grads):
        p.grad = g.clone()
    other[1].step()
    _assert_same(one, other)
    for params, opt in (one, other):
        for p, g in zip(params, grads):
            p.grad = -g
        opt.step()
    _assert_same(one, other)


@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_a_parameter_resized_between_steps_is_named_and_nothing_moves(impl):
    one, other = _twins(impl)
    (a, b), opt = one
    b.data = torch.randn(9)  # was 7
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    a_before = a.detach().clone()
    with pytest.raises(
        ValueError, match=r"parameter 1 has 9 elements \(shape \(9,\)\) but its optimizer state was built for 7"
    ):
        opt.step()
    assert torch.equal(a.detach(), a_before) and opt.state[a]["step"] == 4 and opt.state[b]["step"] == 4


def test_a_parameter_whose_elements_share_memory_is_refused():
    with pytest.raises(ValueError, match=r"params\[1\] \(shape \(4, 3\), strides \(0, 1\)\).*share memory"):
        MicroAdam([torch.zeros(2), torch.zeros(1, 3).expand(4, 3)], **KW)
    (a, b), opt = _trained()
    b.data = torch.zeros(1).expand(7)  # 7 elements on one float, set after the optimizer was built
    a.grad, b.grad = torch.randn_like(a), torch.randn(7)
    a_before = a.detach().clone()
    with pytest.raises(
        ValueError, match=r"parameter 1 \(shape \(7,\), strides \(0,\)\) has elements that share memory"
    ):
        opt.step()
    assert torch.equal(a.detach(), a_before) and opt.state[a]["step"] == 4


def test_two_parameters_on_the_same_elements_are_refused_and_disjoint_views_are_not():
    """A transposed view made a second parameter (a hand-tied decoder): the C++ and Triton paths
    stepped it on a copy and wrote the copy back over the other parameter's update."""
    a = torch.nn.Parameter(torch.randn(16, 24))
    match = r"params\[1\] \(shape \(24, 16\)\) shares memory with params\[0\] \(shape \(16, 24\)\).*Tie them"
    with pytest.raises(ValueError, match=match):
        MicroAdam([a, torch.nn.Parameter(a.data.t())], **KW)
    with pytest.raises(ValueError, match=r"params\[1\] \(shape \(16, 24\)\) shares memory with params\[0\]"):
        MicroAdam([a, torch.nn.Parameter(a.data)], **KW)
    opt = MicroAdam([a], **KW)
    with pytest.raises(ValueError, match=r"params\[0\] \(shape \(8, 24\)\) shares memory with params\[0\] of param"):
        opt.add_param_group({"params": [torch.nn.Parameter(a.data[8:])]})
    assert len(opt.param_groups) == 1
    # Views of one buffer with no element in common (interleaved columns, halves), and a frozen
    # parameter on a trained one's memory (never stepped), are accepted.
    buf = torch.zeros(10, 4)
    MicroAdam([torch.nn.Parameter(buf[:, ::2]), torch.nn.Parameter(buf[:, 1::2])], **KW)
    MicroAdam([torch.nn.Parameter(buf[:5]), torch.nn.Parameter(buf[5:])], **KW)
    MicroAdam([a, torch.nn.Parameter(a.data.t(), requires_grad=False)], **KW)
    # A flat buffer's views (Megatron-style), listed in order or not: only spans that overlap are compared
    # (every pair took 42 s for 4,000 views), and an overlap behind the furthest span is still found.
    flat = torch.zeros(64)
    views = [torch.nn.Parameter(flat[i : i + 8]) for i in range(0, 64, 8)]
    MicroAdam(views, **KW)
    MicroAdam(views[::-1], **KW)
    with pytest.raises(ValueError, match=r"params\[8\] \(shape \(2,\)\) shares memory with params\[1\] \(shape"):
        MicroAdam([*views, torch.nn.Parameter(flat[10:12])], **KW)
    with pytest.raises(ValueError, match=r"params\[8\] \(shape \(2,\)\) shares memory with params\[6\] \(shape"):
        MicroAdam([*views[::-1], torch.nn.Parameter(flat[10:12])], **KW)


def test_a_parameter_listed_twice_is_refused():
    p = torch.nn.Parameter(torch.zeros(5))
    with pytest.raises(ValueError, match=r"params\[2\] \(shape \(5,\)\) appears twice"):
        MicroAdam([p, torch.nn.Parameter(torch.zeros(2)), p], **KW)


@pytest.mark.parametrize(
    "key,value,words",
    [
        ("lr", float("nan"), "lr"),
        ("weight_decay", float("inf"), "weight_decay"),
        ("betas", (1.0, 0.999), "beta parameter at index 0"),
        ("eps", float("-inf"), "eps"),
        ("betas", (0.9, -0.1), "beta parameter at index 1"),
    ],
)
def test_hyperparameters_edited_in_param_groups_are_checked_at_the_step(key, value, words):
    """A scheduler or a user edits param_groups directly: a value the constructor refuses is refused at
    the next step, before anything is written (lr=nan turned every parameter NaN)."""
    (a, b), opt = _trained()
    opt.param_groups[0][key] = value
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    before = a.detach().clone(), {k: v.clone() for k, v in opt.state[a].items() if torch.is_tensor(v)}
    with pytest.raises(ValueError, match=words):
        opt.step()
    assert torch.equal(a.detach(), before[0]) and opt.state[a]["step"] == 4
    assert all(torch.equal(v, opt.state[a][k]) for k, v in before[1].items())


def _failing_on_call(n: int, real):
    calls = []

    def fn(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise torch.OutOfMemoryError("simulated: out of memory")
        return real(*args, **kwargs)

    return fn


def _snapshot(opt):
    return [{k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()} for st in opt.state.values()], [
        {k: v for k, v in g.items() if k != "params"} for g in opt.param_groups
    ]


def _assert_unchanged(opt, snap) -> None:
    states, groups = _snapshot(opt)
    assert groups == snap[1]
    assert len(states) == len(snap[0])
    for st, before in zip(states, snap[0]):
        assert st.keys() == before.keys()
        for k, v in st.items():
            assert torch.equal(v, before[k]) if torch.is_tensor(v) else v == before[k], k


def test_reconfigure_that_runs_out_of_memory_changes_nothing(monkeypatch):
    """A raised window is where memory grows: the second tensor's allocation failing must not leave
    the first converted under the old group settings (every later step raised)."""
    one, other = _twins("cpp")
    snap = _snapshot(one[1])
    # Two allocations (indices, values) per tensor: the third is the second tensor's.
    monkeypatch.setattr(optimizer_module.torch, "zeros", _failing_on_call(3, torch.zeros))
    with pytest.raises(torch.OutOfMemoryError):
        one[1].reconfigure(window=6)
    monkeypatch.undo()
    _assert_unchanged(one[1], snap)
    for _, opt in (one, other):
        opt.reconfigure(window=6)
    for params, opt in (one, other):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    _assert_same(one, other)


def test_fallback_that_runs_out_of_memory_changes_nothing(monkeypatch):
    """The dense state is 8 bytes a parameter: running out of memory at the second tensor must leave
    the first with its MicroAdam state and the group not dense (a KeyError at every later step), and
    a retry must convert both."""
    import microadam.ops.quant as quant

    one, other = _twins("cpp")
    snap = _snapshot(one[1])
    monkeypatch.setattr(quant, "dequantize_blocks", _failing_on_call(2, quant.dequantize_blocks))
    with pytest.raises(torch.OutOfMemoryError):
        one[1].fallback_to_adamw()
    monkeypatch.undo()
    _assert_unchanged(one[1], snap)
    for _, opt in (one, other):
        opt.fallback_to_adamw()
    for params, opt in (one, other):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    _assert_same(one, other)


def test_a_skipped_step_names_the_parameter_by_its_model_name():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = MicroAdam(model.named_parameters(), **KW)
    if "param_names" not in opt.param_groups[0]:
        pytest.skip("this torch keeps no parameter names in param groups (torch < 2.6)")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model[1].bias.grad[1] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"parameter 3 '1.bias' \(shape \(2,\)\) holds nan"):
        opt.step()


def test_groups_must_be_indices():
    (a, b), opt = _trained()
    with pytest.raises(TypeError, match=r"groups takes the indices of param groups, e.g. groups=\[0\], got int 0"):
        opt.reconfigure(density=0.2, groups=0)
    with pytest.raises(TypeError, match="must be an int, got str"):
        opt.fallback_to_adamw(groups=["0"])
    assert opt.param_groups[0]["density"] == 0.1 and not opt.param_groups[0].get("dense", False)


def test_a_near_miss_of_a_setting_in_a_param_group_is_warned_about():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.warns(UserWarning, match="'densty' is not a MicroAdam setting and is ignored; did you mean 'density'"):
        MicroAdam([{"params": [p], "densty": 0.1}], **KW)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MicroAdam([{"params": [p], "name": "decoder"}], **KW)  # a key of the user's own: kept, no warning


def test_a_block_size_edited_in_param_groups_says_it_cannot_change():
    (a, b), opt = _trained()
    opt.param_groups[0]["block_size"] = 5
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    with pytest.raises(ValueError, match="block_size and quant_block_size cannot change during training"):
        opt.step()


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_a_block_size_edit_that_keeps_the_states_shapes_is_refused_too(impl):
    """100 elements make two quantization blocks of 64 or of 96: the shapes did not catch the edit,
    and the error codes were decoded with another block's bounds, in silence."""
    p = torch.nn.Parameter(torch.zeros(100))
    kw = dict(lr=1e-2, block_size=32, quant_block_size=64, density=0.1, window=3)
    opt = MicroAdam([p], impl=impl, **kw)
    for t in range(3):
        p.grad = torch.randn(100, generator=torch.Generator().manual_seed(t))
        opt.step()
    opt.param_groups[0]["quant_block_size"] = 96
    before = p.detach().clone()
    state_before = {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
    with pytest.raises(ValueError, match=r"param group 0 was stepped with block_size=32, quant_block_size=64 and now"):
        opt.step()
    assert torch.equal(p.detach(), before) and opt.state[p]["step"] == 3
    assert all(torch.equal(v, opt.state[p][k]) for k, v in state_before.items())
    # Put back, the run goes on; a new group, or one whose state was dropped, takes new values.
    opt.param_groups[0]["quant_block_size"] = 64
    opt.step()
    assert opt.state[p]["step"] == 4
    opt.state.clear()
    opt.param_groups[0]["quant_block_size"] = 96
    opt.step()
    assert opt.state[p]["error_bounds"].shape == (2, 2)
    # A checkpoint loaded into an optimizer built with the saved sizes resumes.
    fresh = MicroAdam([p], impl=impl, **{**kw, "quant_block_size": 96})
    fresh.load_state_dict(opt.state_dict())
    fresh.step()


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda sd: sd.__setitem__("state", [1]), "'state' is a list, not a dict"),
        (lambda sd: sd.__setitem__("param_groups", None), "'param_groups' must be a list of dicts"),
        (lambda sd: sd["param_groups"][0].pop("params"), "each with a 'params' list"),
        (lambda sd: sd["state"].__setitem__(0, torch.zeros(3)), "parameter 0 is a Tensor, not a dict"),
        (lambda sd: sd["state"].__setitem__(1, None), "parameter 1 is a NoneType, not a dict"),
        (lambda sd: sd["state"][0].__setitem__("numel", torch.tensor([25, 25])), "numel of parameter 0 is tensor"),
        (lambda sd: sd["state"][0].__setitem__("numel", 25.5), "numel of parameter 0 is 25.5"),
    ],
    ids=["state-list", "groups-none", "group-without-params", "entry-tensor", "entry-none", "numel-2", "numel-float"],
)
def test_a_malformed_state_dict_is_named_and_changes_nothing(edit, words):
    (a, b), opt = _trained()
    sd = opt.state_dict()
    sd["state"] = {k: dict(v) for k, v in sd["state"].items()}
    edit(sd)
    snap = _snapshot(opt)
    with pytest.raises(ValueError, match=words):
        opt.load_state_dict(sd)
    _assert_unchanged(opt, snap)


def test_a_float8_parameter_is_refused_when_the_optimizer_is_built():
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8")
    with pytest.raises(TypeError, match=r"got params\[0\] of torch.float8_e4m3fn; keep a master copy"):
        MicroAdam([torch.zeros(4, dtype=torch.float8_e4m3fn, requires_grad=True)], **KW)


def test_the_torch_path_checks_every_state_before_writing_any():
    (a, b), opt = _trained()
    for group in opt.param_groups:
        group["impl"] = "torch"
    opt.state[b]["error_bounds"] = opt.state[b]["error_bounds"][:1]  # another layout's shape
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    a_before = a.detach().clone()
    with pytest.raises(ValueError, match="error_bounds must be torch.bfloat16 of shape"):
        opt.step()
    assert torch.equal(a.detach(), a_before) and opt.state[a]["step"] == 4


def test_a_dense_groups_hyperparameters_are_checked_at_the_step_too():
    (a, b), opt = _trained()
    opt.fallback_to_adamw()
    opt.param_groups[0]["lr"] = float("nan")
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    before = a.detach().clone()
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert torch.equal(a.detach(), before)


def test_a_dense_step_that_fails_half_way_changes_nothing(monkeypatch):
    (a, b), opt = _trained()
    opt.fallback_to_adamw()
    snap = _snapshot(opt)
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    before = a.detach().clone()
    real = torch.Tensor.sqrt

    def no_memory(self):
        raise torch.OutOfMemoryError("simulated: out of memory")

    monkeypatch.setattr(torch.Tensor, "sqrt", no_memory)
    with pytest.raises(torch.OutOfMemoryError):
        opt.step()
    monkeypatch.setattr(torch.Tensor, "sqrt", real)
    _assert_unchanged(opt, snap)
    assert torch.equal(a.detach(), before)


def test_a_float64_parameter_under_impl_cpp_is_counted_as_it_is_written(monkeypatch):
    """The C++ call hands float64 to the torch path; the optimizer steps it there itself, so that a
    C++ call failing afterwards (out of memory for its scratch) leaves no write uncounted."""
    from microadam.kernels import cpu

    a = torch.nn.Parameter(torch.randn(25, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(7))
    opt = MicroAdam([a, b], **dict(KW, impl="cpp"))
    for _ in range(2):
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        opt.step()

    def no_scratch(pending):
        raise MemoryError("impl='cpp' could not allocate its per-thread scratch (simulated); nothing was written")

    monkeypatch.setattr(cpu, "_step_all", no_scratch)
    a_before, b_before = a.detach().clone(), b.detach().clone()
    with pytest.raises(MemoryError):
        opt.step()
    for p, before in ((a, a_before), (b, b_before)):
        assert opt.state[p]["step"] == (2 if torch.equal(p.detach(), before) else 3)


def test_every_signal_held_during_a_step_reaches_its_handler(monkeypatch):
    """SIGINT and SIGTERM during one step: SIGINT's KeyboardInterrupt must not swallow SIGTERM's
    handler (a cluster's handler that saves a checkpoint before the job is killed)."""
    import os
    import signal

    (a, b), opt = _trained()
    real = optimizer_module.microadam_step
    for group in opt.param_groups:
        group["impl"] = "torch"

    sent = []

    def interrupted(p, g, **kw):
        real(p, g, **kw)
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGINT))
            os.kill(os.getpid(), signal.SIGTERM)

    terms = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: terms.append(signum))
    try:
        monkeypatch.setattr(optimizer_module, "microadam_step", interrupted)
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        with pytest.raises(KeyboardInterrupt):
            opt.step()
    finally:
        signal.signal(signal.SIGTERM, old)
    assert terms == [signal.SIGTERM]
    assert opt.state[a]["step"] == opt.state[b]["step"] == 5


def test_a_second_ctrl_c_interrupts_a_step_at_once(monkeypatch):
    """A step that hangs must stay interruptible: the same signal twice is delivered at once."""
    import os
    import signal

    (a, b), opt = _trained()
    for group in opt.param_groups:
        group["impl"] = "torch"
    after = []

    def twice(p, g, **kw):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        after.append(1)  # not reached: the second one raises in the step

    monkeypatch.setattr(optimizer_module, "microadam_step", twice)
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    assert after == []


@pytest.mark.parametrize("numel", [np.int64(25), 25.0, torch.tensor(25.0), torch.tensor(25)], ids=str)
def test_a_whole_number_numel_of_any_type_loads(numel):
    (a, b), opt = _trained()
    sd = opt.state_dict()
    sd["state"] = {k: dict(v) for k, v in sd["state"].items()}
    sd["state"][0]["numel"] = numel
    opt.load_state_dict(sd)
    assert opt.state[a]["numel"] == 25 and type(opt.state[a]["numel"]) is int


def test_a_step_off_the_main_thread_runs_without_holding_signals():
    """Python sets signal handlers on the main thread only; a step elsewhere (a trainer's worker thread)
    must neither raise for it nor change the handlers."""
    import signal
    import threading

    (a, b), opt = _trained()
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    errors = []

    def run():
        try:
            a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
            opt.step()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert errors == [] and opt.state[a]["step"] == 5
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


_TERM_TWICE = r"""
import os, signal, sys
import torch
import microadam.optimizer as om
from microadam import MicroAdam
signal.signal(signal.SIGTERM, signal.SIG_DFL if sys.argv[1] == "default" else lambda s, f: print("handler", flush=True))
p = torch.nn.Parameter(torch.randn(10))
opt = MicroAdam([p], lr=1e-2, impl="torch")
real = om.microadam_step
def twice(param, grad, **kw):
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)
    real(param, grad, **kw)
om.microadam_step = twice
p.grad = torch.randn(10)
opt.step()
print("after step", opt.state[p]["step"], flush=True)
"""


@pytest.mark.parametrize("handler", ["default", "python"])
def test_sigterm_twice_during_a_step_acts_once(tmp_path, handler):
    """The second SIGTERM is handed on at once: with the default action the process ends (it must not
    come back to the held handler), a Python handler runs once."""
    import signal
    import subprocess
    import sys

    script = tmp_path / "term_twice.py"
    script.write_text(_TERM_TWICE)
    run = subprocess.run([sys.executable, str(script), handler], capture_output=True, text=True, timeout=120)
    if handler == "default":
        assert run.returncode == -signal.SIGTERM, (run.returncode, run.stdout, run.stderr[-2000:])
        assert "after step" not in run.stdout
    else:
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.count("handler") == 1 and "after step 1" in run.stdout


def test_what_schedulers_set_is_taken_at_the_step():
    """A scheduler decaying to 0 by repeated arithmetic ends a hair below it (LinearLR with end_factor 0:
    -4.4e-20 here), and a lambda may return NumPy scalars: torch's optimizers take both after they were
    built, and so does MicroAdam's per-step check (which is there for NaN and Inf)."""
    (a, b), opt = _trained()
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, end_factor=0.0, total_iters=5)
    for _ in range(6):
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        opt.step()
        sched.step()
    assert -1e-15 < opt.param_groups[0]["lr"] < 0.0  # the case: a hair below 0
    (a, b), opt = _trained()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: np.float32(0.5) ** t)
    for _ in range(3):
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        opt.step()
        sched.step()
    assert opt.state[a]["step"] == 7


# ---------------------------------------------------------------- found by the audit of 2026-12-01 (session 18)


def test_a_dense_fallback_follows_a_parameter_converted_to_float64_and_back():
    """After fallback_to_adamw, model.double() made the first float64 tensor fail the step after the
    tensors before it were written (a retry stepped them twice). The moments now follow the dtype."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 6))
    opt = MicroAdam(m.parameters(), **KW)
    m(torch.randn(2, 6)).sum().backward()
    opt.step()
    opt.zero_grad()
    opt.fallback_to_adamw()
    for dtype in (torch.float64, torch.float32):
        m[1].to(dtype)
        m[1](m[0](torch.randn(2, 6)).to(dtype)).sum().backward()
        opt.step()
        opt.zero_grad()
        assert {opt.state[p]["exp_avg"].dtype for p in m[1].parameters()} == {dtype}
        assert {opt.state[p]["step"] for p in m.parameters()} == {3 if dtype == torch.float32 else 2}
        assert all(torch.isfinite(p).all() for p in m.parameters())
    # A float32 dense checkpoint loads into the float64 model (its moments cast, as torch casts them).
    sd = opt.state_dict()
    m.double()
    again = MicroAdam(m.parameters(), **KW)
    again.fallback_to_adamw()
    again.load_state_dict(sd)
    assert {st["exp_avg"].dtype for st in again.state.values()} == {torch.float64}


@pytest.mark.parametrize("dtype", ["complex64", "float8_e4m3fn"])
def test_a_parameter_converted_to_a_dtype_microadam_cannot_step_is_named_at_the_step(dtype):
    if not hasattr(torch, dtype):
        pytest.skip(f"this torch has no {dtype}")
    (a, b), opt = _trained()
    snap = _snapshot(opt)
    before = [a.detach().clone(), b.detach().clone()]
    b.data = b.data.to(getattr(torch, dtype))
    a.grad, b.grad = torch.randn_like(a), torch.ones(7).to(getattr(torch, dtype))
    with pytest.raises(TypeError, match=rf"parameter 1 \(shape \(7,\)\) is torch.{dtype} and has a gradient.*convert"):
        opt.step()
    _assert_unchanged(opt, snap)
    assert torch.equal(a.detach(), before[0])


def test_a_frozen_integer_parameter_is_accepted_and_left_alone():
    """A LoRA model over int8 base weights: MicroAdam(model.parameters()) works, as torch's optimizers do."""
    q = torch.nn.Parameter(torch.randint(-127, 127, (6, 6), dtype=torch.int8), requires_grad=False)
    lora = torch.nn.Linear(6, 6)
    opt = MicroAdam([q, *lora.parameters()], **KW)
    q_before = q.detach().clone()
    for _ in range(3):
        x = torch.randn(4, 6)
        (lora(x) + x @ q.float()).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(q, q_before) and q not in opt.state
    assert all(opt.state[p]["step"] == 3 for p in lora.parameters())
    # One that is given a gradient anyway is refused at the step, by name, before anything is written.
    q.grad = torch.ones_like(q)
    with pytest.raises(TypeError, match=r"parameter 0 \(shape \(6, 6\)\) is torch.int8 and has a gradient"):
        opt.step()
    assert torch.equal(q, q_before) and all(opt.state[p]["step"] == 3 for p in lora.parameters())


@pytest.mark.parametrize(
    "call,error,words",
    [
        (lambda opt: opt.load_state_dict("ckpt/optimizer.pt"), TypeError, r"got str \(a path\? load it first"),
        (lambda opt: opt.load_state_dict(None), TypeError, "takes the dict that optimizer.state_dict"),
        (lambda opt: opt.add_param_group([torch.zeros(3)]), TypeError, "param_group must be a dict, got list"),
        (lambda opt: MicroAdam([torch.zeros(3)], lr=1e-3, variant=[]), ValueError, r"Invalid variant: \[\]"),
        (lambda opt: Guard(torch.nn.Linear(2, 1), opt, {"snapshot_every": 5}), TypeError, "must be a GuardPolicy"),
        (lambda opt: Guard(torch.nn.Linear(2, 1), None), TypeError, "optimizer must be a torch.optim.Optimizer"),
        (lambda opt: Guard(None, opt), TypeError, "model must be a torch.nn.Module"),
        (lambda opt: GuardPolicy(on_spike=None), TypeError, "on_spike must be a tuple of actions, got NoneType"),
    ],
    ids=[
        "load-path",
        "load-none",
        "group-list",
        "variant-list",
        "policy-dict",
        "guard-no-opt",
        "guard-no-model",
        "actions-none",
    ],
)
def test_a_wrong_kind_of_argument_is_named_and_changes_nothing(call, error, words):
    (a, b), opt = _trained()
    snap = _snapshot(opt)
    with pytest.raises(error, match=words):
        call(opt)
    _assert_unchanged(opt, snap)


def test_a_reference_curve_of_numpy_numbers_is_taken_as_python_numbers():
    steps, losses = np.arange(0, 50, 10), np.linspace(2.0, 1.0, 5, dtype=np.float32)
    policy = GuardPolicy(reference_curve=list(zip(steps, losses)))
    assert policy.reference_curve[1] == (10, pytest.approx(1.75)) and type(policy.reference_curve[1][0]) is int
    assert type(policy.reference_curve[1][1]) is float


@pytest.mark.parametrize("loss", [torch.ones(8), "0.5", [0.5]], ids=["per-sample", "str", "list"])
def test_a_loss_that_is_not_one_number_is_refused_before_the_guard_counts_the_step(loss):
    (a, b), opt = _trained()
    guard = Guard(torch.nn.ParameterList([a, b]), opt, GuardPolicy())
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    snap = _snapshot(opt)
    for _ in range(2):
        with pytest.raises((TypeError, ValueError), match="the guard judges one loss per step.*nothing was changed"):
            guard.step(loss)
    assert guard.step_count == 0
    _assert_unchanged(opt, snap)


@pytest.mark.parametrize("impl", ["torch", "cpp"])
@pytest.mark.parametrize(
    "name,value,error,words",
    [
        ("error_rounding", "bogus", ValueError, "Invalid error_rounding: 'bogus'"),
        ("lr", float("nan"), ValueError, "Invalid lr: nan; it must be a finite number"),
        ("eps", float("inf"), ValueError, "Invalid eps: inf"),
        ("weight_decay", float("nan"), ValueError, "Invalid weight_decay"),
        ("beta1", 1.0, ValueError, r"Invalid beta1: 1.0; it must be in \[0, 1\)"),
        ("beta2", 1.5, ValueError, "Invalid beta2: 1.5"),
        ("release", 2.0, ValueError, r"Invalid release: 2.0; it must be in \[0, 1\]"),
        ("release_scale", -1.0, ValueError, "Invalid release_scale: -1.0; it must be a finite number >= 0"),
        ("step", torch.tensor(3.0), TypeError, r"Invalid step: tensor\(3\.\); it must be an int >= 1"),
        ("step", 1.5, TypeError, "Invalid step: 1.5; it must be an int"),
        ("step", 0, ValueError, "Invalid step: 0; it must be >= 1"),
        ("seed", 2**32, ValueError, r"Invalid seed: 4294967296; it must be in \[0, 2\*\*32\)"),
        ("seed", -1, ValueError, "Invalid seed: -1"),
        ("step", True, TypeError, "Invalid step: True; it must be an int"),
        ("seed", True, TypeError, r"Invalid seed: True \(bool\); it must be an int in \[0, 2\*\*32\)"),
    ],
)
def test_the_functional_step_refuses_what_microadam_refuses_on_every_path(impl, name, value, error, words):
    """The torch path took an unknown error_rounding as 'nearest' (the C++ path refused it), and both
    took lr=nan (every parameter NaN) or beta1=1 (a division by zero). A float tensor step (torch.optim's
    own states keep one) failed with an unnamed error deep in the hashing, and a seed of 2**32 or more
    used the low 32 bits' random stream, another seed's."""
    from microadam.functional import microadam_step, zero_state
    from microadam.layout import layout_for

    lay = layout_for(300, block_size=64, density=0.1, quant_block_size=32, window=4)
    state = zero_state(lay, "cpu")
    param = torch.randn(300, generator=torch.Generator().manual_seed(0))
    before = param.clone(), {k: v.clone() for k, v in state.items()}
    kw = dict(layout=lay, step=1, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, error_rounding="nearest",
              stochastic_param_rounding=False, seed=0, param_index=0, impl=impl, release=0.5)  # fmt: skip
    kw[name] = value
    with pytest.raises(error, match=words):
        microadam_step(param, torch.ones(300), **state, **kw)
    assert torch.equal(param, before[0]) and all(torch.equal(v, before[1][k]) for k, v in state.items())


def test_the_functional_step_takes_any_integer_seed_as_before():
    """check_seed, shared with MicroAdam's groups (which are saved, so a Python int only), at first refused
    a NumPy or tensor integer seed here, which this call had taken: it keeps nothing."""
    np = pytest.importorskip("numpy")
    from microadam.functional import microadam_step, zero_state
    from microadam.layout import layout_for

    lay = layout_for(300, block_size=64, density=0.1, quant_block_size=32, window=4)
    kw = dict(layout=lay, step=1, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
              error_rounding="stochastic", stochastic_param_rounding=True, param_index=0, impl="torch")  # fmt: skip
    runs = []
    for seed in (5, np.int64(5), torch.tensor(5), 6):
        param, state = torch.ones(300), zero_state(lay, "cpu")
        microadam_step(param, torch.linspace(-1, 1, 300), **state, seed=seed, **kw)
        runs.append(torch.cat([param, state["error_codes"].float()]))
    assert all(torch.equal(runs[0], r) for r in runs[1:3])
    assert not torch.equal(runs[0], runs[3])  # the seed is used: another one rounds the error otherwise


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_the_functional_step_with_grad_enabled_steps_a_leaf_parameter_as_under_no_grad(impl):
    """Outside no_grad the torch path wrote the state, then failed at the in-place update of a leaf that
    requires grad (a retry applied the gradient twice), while the C++ path stepped. Both step now."""
    from microadam.functional import microadam_step, zero_state
    from microadam.layout import layout_for

    lay = layout_for(300, block_size=64, density=0.1, quant_block_size=32, window=4)
    kw = dict(layout=lay, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, error_rounding="nearest",
              stochastic_param_rounding=False, seed=0, param_index=0, impl=impl, release=0.5)  # fmt: skip
    init, grads = torch.randn(300), [torch.randn(300) for _ in range(3)]
    runs = []
    for grad_mode in (False, True):
        param, state = torch.nn.Parameter(init.clone()), zero_state(lay, "cpu")
        with torch.set_grad_enabled(grad_mode):
            for t, g in enumerate(grads, 1):
                microadam_step(param, g, **state, step=t, **kw)
        runs.append((param.detach(), state))
    (p0, s0), (p1, s1) = runs
    assert torch.equal(p0, p1) and all(torch.equal(s0[k], s1[k]) for k in s0)
    assert not torch.equal(p1, init)


def test_a_fraction_lr_is_kept_as_a_float_and_the_checkpoint_loads_weights_only(tmp_path):
    import fractions

    p = torch.nn.Parameter(torch.randn(10))
    opt = MicroAdam([p], lr=fractions.Fraction(1, 1000), betas=(fractions.Fraction(9, 10), 0.999))
    assert type(opt.param_groups[0]["lr"]) is float and type(opt.param_groups[0]["betas"][0]) is float
    p.grad = torch.randn(10)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    MicroAdam([p], lr=1e-3).load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))


def test_a_bad_hyperparameter_at_step_or_load_names_its_param_group():
    """With several groups (no decay for biases, as Trainer builds them) "Invalid lr: inf" did not say
    which group a scheduler or an edit had broken, at a step or in a checkpoint."""
    a, b = torch.nn.Parameter(torch.randn(40)), torch.nn.Parameter(torch.randn(8))
    opt = MicroAdam([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], lr=1e-2)
    a.grad, b.grad = torch.randn(40), torch.randn(8)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    opt.param_groups[1]["lr"] = float("inf")
    with pytest.raises(ValueError, match=r"^param_groups\[1\]: Invalid lr: inf"):
        opt.step()
    opt.param_groups[1]["lr"] = 1e-2
    saved["param_groups"][1]["betas"] = (0.9, 1.0)
    with pytest.raises(ValueError, match=r"^the loaded param group 1: Invalid beta"):
        opt.load_state_dict(saved)


def test_a_first_step_whose_implementation_is_missing_creates_and_counts_nothing(monkeypatch):
    """A missing implementation (impl="triton" without CUDA, "cpp" without a compiler) was found in the
    write phase of a first step: the states were already created and a meta-device parameter's step
    already counted, so once the impl was fixed the meta parameter was one step ahead."""
    real = optimizer_module.load_phases

    def missing(name):
        if name == "cpp":
            raise RuntimeError("impl='cpp' is not available here (test)")
        return real(name)

    a, b = torch.nn.Parameter(torch.randn(50)), torch.nn.Parameter(torch.randn(50))
    meta = torch.nn.Parameter(torch.empty(10, device="meta"))
    opt = MicroAdam([{"params": [a, meta], "impl": "torch"}, {"params": [b], "impl": "cpp"}], lr=1e-2)
    a.grad, b.grad, meta.grad = torch.randn(50), torch.randn(50), torch.empty(10, device="meta")
    monkeypatch.setattr(optimizer_module, "load_phases", missing)
    with pytest.raises(RuntimeError, match="impl='cpp' is not available"):
        opt.step()
    assert not any(opt.state.get(p) for p in (a, b, meta))
    opt.param_groups[1]["impl"] = "torch"
    opt.step()
    assert [opt.state[p]["step"] for p in (a, meta, b)] == [1, 1, 1]


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_a_state_that_no_longer_fits_names_its_parameter(impl):
    """A window edited in param_groups (not through reconfigure) leaves every state of the group in
    another layout: the error said "window_indices must be ... of shape (4, 1, 1)" without saying whose."""
    a, b = torch.nn.Parameter(torch.randn(40)), torch.nn.Parameter(torch.randn(8))
    opt = MicroAdam([{"params": [a]}, {"params": [b]}], lr=1e-2, window=4, impl=impl)
    a.grad, b.grad = torch.randn(40), torch.randn(8)
    opt.step()
    opt.param_groups[1]["window"] = 10
    with pytest.raises(ValueError, match=r"^parameter 1: window_indices must be torch.int16 of shape .*reconfigure"):
        opt.step()
    assert opt.state[a]["step"] == 1 and opt.state[b]["step"] == 1


def test_a_float64_parameter_under_impl_cpp_needs_no_compiler(monkeypatch):
    """float64 takes the torch path under impl="cpp"; loading the C++ path before a first step (so that a
    missing one is raised before anything is created) must not require it for float64 alone."""
    real = optimizer_module.load_phases

    def missing(name):
        if name == "cpp":
            raise RuntimeError("impl='cpp' is not available here (test)")
        return real(name)

    p = torch.nn.Parameter(torch.randn(50, dtype=torch.float64))
    opt = MicroAdam([p], lr=1e-2, impl="cpp")
    p.grad = torch.randn(50, dtype=torch.float64)
    monkeypatch.setattr(optimizer_module, "load_phases", missing)
    opt.step()
    assert opt.state[p]["step"] == 1
