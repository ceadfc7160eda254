"""accelerate: the guard given the prepared optimizer (an AcceleratedOptimizer wrapping MicroAdam)."""

from __future__ import annotations

import pytest
import torch

accelerate = pytest.importorskip("accelerate", reason="accelerate is in the 'integrations' extra")

from microadam import MicroAdam  # noqa: E402
from microadam.guard import Guard, GuardPolicy  # noqa: E402


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
