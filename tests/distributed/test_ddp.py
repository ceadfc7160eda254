"""DDP (2 processes, gloo, CPU): every rank ends with the same parameters, equal to one process.

Under DDP each rank holds the whole parameter and receives the all-reduced (averaged) gradient, so
MicroAdam, which is deterministic, takes the same step on every rank with no extra communication.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from microadam import MicroAdam

pytestmark = pytest.mark.distributed

KW = dict(lr=3e-3, density=0.05, block_size=256, quant_block_size=32, weight_decay=0.01)
STEPS, BATCH = 15, 16


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, 2 * BATCH, 20, generator=g), torch.randint(0, 3, (STEPS, 2 * BATCH), generator=g)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = torch.nn.parallel.DistributedDataParallel(_model())
    opt = MicroAdam(model.parameters(), **KW)
    x, y = _data()
    for s in range(STEPS):
        xb, yb = x[s, rank * BATCH : (rank + 1) * BATCH], y[s, rank * BATCH : (rank + 1) * BATCH]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    torch.save([p.detach().clone() for p in model.module.parameters()], f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_matches_a_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
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
