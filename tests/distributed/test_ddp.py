"""DDP (2 processes, gloo, CPU): every rank ends with the same parameters, equal to one process.

Under DDP each rank holds the whole parameter and receives the all-reduced (averaged) gradient, so
MicroAdam, which is deterministic, takes the same step on every rank with no extra communication.
"""

from __future__ import annotations

import pytest
import torch

from microadam import MicroAdam

from .launch import spawn

pytestmark = pytest.mark.distributed

KW = dict(lr=3e-3, density=0.05, block_size=256, quant_block_size=32, weight_decay=0.01)
STEPS, BATCH = 15, 16


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, 2 * BATCH, 20, generator=g), torch.randint(0, 3, (STEPS, 2 * BATCH), generator=g)


def _worker(rank: int, world: int, out: str) -> None:
    model = torch.nn.parallel.DistributedDataParallel(_model())
    opt = MicroAdam(model.parameters(), **KW)
    x, y = _data()
    for s in range(STEPS):
        xb, yb = x[s, rank * BATCH : (rank + 1) * BATCH], y[s, rank * BATCH : (rank + 1) * BATCH]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    torch.save([p.detach().clone() for p in model.module.parameters()], f"{out}/rank{rank}.pt")


def test_ddp_matches_a_single_process(tmp_path):
    spawn(_worker, str(tmp_path))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(r0, r1)), "ranks diverged"
    # One process on the whole batch: the mean loss's gradient is the average DDP all-reduces.
    model = _model()
    opt = MicroAdam(model.parameters(), **KW)
    x, y = _data()
    for s in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[s]), y[s]).backward()
        opt.step()
    for a, b in zip(r0, model.parameters()):
        # Gradients agree up to the order of float32 additions (two half-batch means averaged by
        # all-reduce against one full-batch mean), so Top-K ties aside the runs agree to rounding.
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-5)
