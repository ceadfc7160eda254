"""accelerate: the guard given the prepared optimizer (an AcceleratedOptimizer wrapping MicroAdam)."""

from __future__ import annotations

import pytest
import torch

accelerate = pytest.importorskip("accelerate", reason="accelerate is in the 'integrations' extra")

from microadam import MicroAdam  # noqa: E402
from microadam.guard import Guard, GuardPolicy, load_checkpoint  # noqa: E402


def test_guard_reaches_microadam_through_the_prepared_optimizer():
    """Passing the object accelerate returns is the natural thing in an accelerate loop: the
    compression checks and actions must still find MicroAdam (they were silently off)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2))
    opt = MicroAdam(model.parameters(), lr=1e-3, block_size=256, quant_block_size=32, density=0.05)
    acc = accelerate.Accelerator(cpu=True)
    model, prepared = acc.prepare(model, opt)
    assert prepared is not opt and prepared.optimizer is opt
    # Any error feedback exceeds this ratio: the drift check raises the density at the first check.
    policy = GuardPolicy(max_error_ratio=1e-6, error_check_every=1, on_error_drift=("raise_density",))
    guard = Guard(model, prepared, policy)
    for _ in range(2):
        loss = model(torch.randn(8, 32)).square().mean()
        acc.backward(loss)
        guard.step(loss)
        prepared.zero_grad()
    drift = [e for e in guard.events if e.event == "error_drift"]
    assert drift and drift[0].result["group0_density"] == 0.1
    assert opt.param_groups[0]["density"] == 0.1


def test_lower_lr_stays_in_force_through_accelerates_scheduler_wrapper():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    opt = MicroAdam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    acc = accelerate.Accelerator(cpu=True)
    model, prepared, prepared_sched = acc.prepare(model, opt, sched)
    assert prepared_sched is not sched
    guard = Guard(model, prepared, GuardPolicy(), scheduler=prepared_sched)
    guard._act("loss_spike", {}, ("lower_lr",))
    for _ in range(3):
        model(torch.randn(4, 8)).square().mean().backward()
        prepared.step()
        prepared_sched.step()
        prepared.zero_grad()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)  # was back at 1e-2 after one step


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


KW = {"lr": 1e-2, "block_size": 256, "quant_block_size": 32, "density": 0.1}


def test_under_gradient_accumulation_the_guard_judges_optimizer_steps_not_micro_batches():
    """accelerate's documented loop calls optimizer.step() on every micro-batch (the wrapper steps only
    on the window's last). The guard did the same with guard.step(loss): one NaN micro-batch, whose NaN
    stays in the accumulated gradients until the window ends, made 4 non-finite events and a rollback
    at the default patience of 3, and step_count (patience, snapshot_every, reference_curve) counted
    micro-batches. The window is now one step, judged on its losses' mean."""
    model = _mlp()
    opt = MicroAdam(model.parameters(), **KW)
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=4)
    model, prepared = acc.prepare(model, opt)
    guard = Guard(model, prepared, GuardPolicy(snapshot_every=1))
    g = torch.Generator().manual_seed(0)
    losses = []
    for i in range(1, 13):
        with acc.accumulate(model):
            loss = model(torch.randn(4, 8, generator=g)).square().mean()
            if i == 5:
                loss = loss * float("nan")
            losses.append(loss.item())
            acc.backward(loss)
            guard.step(loss)
            prepared.zero_grad()
    assert [(e.step, e.event, e.actions) for e in guard.events] == [(2, "nonfinite", ["skip"])]
    assert guard.step_count == 3 and guard.rollbacks == 0
    assert all(s["step"] == 2 for s in opt.state.values())  # windows 1 and 3 stepped, 2 skipped
    assert list(guard.losses) == pytest.approx([sum(losses[:4]) / 4, sum(losses[8:]) / 4])


def test_under_fp16_the_guard_uses_the_scaler_the_prepared_optimizer_holds(tmp_path):
    """Under fp16 accelerate's prepared optimizer holds a GradScaler, and its step() runs scaler.step and
    scaler.update. guard.step(loss, scaler=that scaler) unscaled the wrapper, stepped it (which
    unscaled again) and updated the scaler a second time: AssertionError at every step, after the
    optimizer had stepped on twice-unscaled gradients. Without scaler= an fp16 overflow counted as
    non-finite. fp16 AMP needs CUDA: here accelerate's real wrapper holds a CPU GradScaler."""
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.scheduler import AcceleratedScheduler

    accelerate.Accelerator(cpu=True)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 8, generator=g) for _ in range(4)]

    plain = _mlp()
    plain_opt, plain_scaler = MicroAdam(plain.parameters(), **KW), torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for i, x in enumerate(xs):
        if i == 2:
            continue  # the overflow step below: skipped by the scaler
        plain_scaler.scale(plain(x).square().mean()).backward()
        plain_scaler.step(plain_opt)
        plain_scaler.update()
        plain_opt.zero_grad()

    for pass_scaler in (False, True):
        model = _mlp()
        opt, scaler = MicroAdam(model.parameters(), **KW), torch.amp.GradScaler("cpu", init_scale=2.0**10)
        prepared = AcceleratedOptimizer(opt, device_placement=False, scaler=scaler)
        # accelerate's scheduler wrapper holds the schedule on a step the scaler skipped, as it must with
        # the guard too (the guard skips the overflow without calling the wrapper's step).
        sched = AcceleratedScheduler(torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0), prepared)
        policy = GuardPolicy(patience=1, snapshot_every=1, checkpoint_dir=str(tmp_path / str(pass_scaler)))
        guard = Guard(model, prepared, policy, scheduler=sched)
        for i, x in enumerate(xs):
            loss = model(x).square().mean()
            scaler.scale(loss).backward()  # what accelerator.backward does under fp16
            if i == 2:
                model[0].weight.grad[0, 0] = float("inf")
            guard.step(loss, scaler=scaler if pass_scaler else None)
            sched.step()
            prepared.zero_grad()
        assert [(e.step, e.event) for e in guard.events] == [(3, "overflow")] and guard.rollbacks == 0
        assert scaler.get_scale() == 2.0**9 and sched.scheduler.last_epoch == 3
        # The checkpoint holds the wrapper's scaler as the next step starts, as for a scaler given.
        assert load_checkpoint(guard.checkpoint_path())["scaler"] == scaler.state_dict()
        # The same weights as torch's plain scaler loop: unscaled once, stepped once.
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))
