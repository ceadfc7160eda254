"""The guard under DDP (2 processes, gloo, CPU): one decision for all ranks, one log, a checkpoint per rank.

A NaN on one rank only and a loss spike seen on one rank only must make every rank act alike (a rank
that skipped while another stepped would leave the replicas apart for good); each rank writes and
resumes from its own checkpoint file (under FSDP each holds a different shard), and the event log
is written once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from microadam import MicroAdam
from microadam.guard import Guard, GuardPolicy
from tests.common import NEEDS_FSDP2

from .launch import spawn

pytestmark = pytest.mark.distributed

STEPS, BATCH = 24, 16


def _setup(folder: str, resume: bool = False) -> tuple[torch.nn.Module, MicroAdam, Guard]:
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
    )
    opt = MicroAdam(model.parameters(), lr=3e-3, density=0.05, block_size=256, quant_block_size=32)
    policy = GuardPolicy(snapshot_every=5, warmup=3, checkpoint_dir=f"{folder}/ckpt", log_path=f"{folder}/events.jsonl")
    return model, opt, Guard(model, opt, policy, resume=resume)


def _worker(rank: int, world: int, folder: str) -> None:
    model, opt, guard = _setup(folder)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(STEPS, 2 * BATCH, 20, generator=g), torch.randint(0, 3, (STEPS, 2 * BATCH), generator=g)
    for s in range(1, STEPS + 1):
        xb, yb = x[s - 1, rank * BATCH : (rank + 1) * BATCH], y[s - 1, rank * BATCH : (rank + 1) * BATCH]
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        if s == 8 and rank == 1:  # after the all-reduce: only this rank sees it
            next(model.parameters()).grad[0, 0] = float("nan")
        if s in (15, 16) and rank == 0:  # a spike that only rank 0's batch shows, twice in a row
            loss = loss.detach() * 1000
        guard.step(loss)
        opt.zero_grad()
    out = {
        "params": [p.detach().clone() for p in model.module.parameters()],
        "events": [(e.step, e.event, e.actions) for e in guard.events],
        "step": guard.step_count,
        "path": str(guard.checkpoint_path()),
    }
    torch.save(out, f"{folder}/rank{rank}.pt")


def _resume_worker(rank: int, world: int, folder: str) -> None:
    model, opt, guard = _setup(folder, resume=True)
    saved = torch.load(f"{folder}/ckpt/guard-last.rank{rank}.pt", weights_only=True)
    assert guard.step_count == saved["guard"]["step"]
    for a, b in zip(model.state_dict().values(), saved["model"].values()):
        assert torch.equal(a, b)


def test_every_rank_takes_the_same_decisions_and_keeps_its_own_checkpoint(tmp_path: Path) -> None:
    spawn(_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["events"] == r1["events"]
    kinds = [(step, event, actions) for step, event, actions in r0["events"]]
    assert (8, "nonfinite", ["skip"]) in kinds
    assert (15, "loss_spike", ["none"]) in kinds and (16, "loss_spike", ["rollback", "lower_lr"]) in kinds
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"])), "the replicas drifted apart"
    ckpt = tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["guard-last.rank0.pt", "guard-last.rank1.pt"]
    assert r0["path"].endswith("guard-last.rank0.pt") and r1["path"].endswith("guard-last.rank1.pt")
    rows = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(r["step"], r["event"], r["actions"]) for r in rows] == [tuple(e) for e in r0["events"]]
    spawn(_resume_worker, str(tmp_path))


def _fsdp_setup(folder: str, resume: bool = False) -> tuple[torch.nn.Module, MicroAdam, Guard]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    # 64 rows of 20: 32 per rank, whole blocks of 128 (state saved as Shard DTensors); the biases of
    # 64 and 3 are split mid-block (state re-cut, the exact shards in a bytes blob).
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
    fully_shard(model)
    opt = MicroAdam(model.parameters(), lr=3e-3, density=0.05, block_size=128, quant_block_size=32)
    policy = GuardPolicy(snapshot_every=4, warmup=3, checkpoint_dir=f"{folder}/ckpt")
    return model, opt, Guard(model, opt, policy, resume=resume)


def _fsdp_worker(rank: int, world: int, folder: str) -> None:
    model, opt, guard = _fsdp_setup(folder)
    g = torch.Generator().manual_seed(1)
    for s in range(1, 11):
        x, y = torch.randn(BATCH, 20, generator=g), torch.randint(0, 3, (BATCH,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if s == 6 and rank == 1:  # in this rank's shard only: the other rank's gradients are finite
            model[0].weight.grad.to_local()[0, 0] = float("nan")
        guard.step(loss)
        opt.zero_grad()
    events = [(e.step, e.event) for e in guard.events]
    said = [e.seen.get("gradient") for e in guard.events]
    torch.save({"step": guard.step_count, "events": events, "said": said}, f"{folder}/r{rank}.pt")


def _fsdp_resume_worker(rank: int, world: int, folder: str) -> None:
    model, opt, guard = _fsdp_setup(folder, resume=True)
    steps = sorted({s["step"] for s in opt.state.values()})
    torch.save({"step": guard.step_count, "opt_steps": steps}, f"{folder}/x{rank}.pt")


@NEEDS_FSDP2
def test_fsdp2_per_rank_guard_checkpoints_resume(tmp_path: Path) -> None:
    # The per-rank file holds DTensors and the sharded optimizer state; resume=True reads it with
    # torch.load(weights_only=True), which the state must pass (an empty bytes object does not).
    spawn(_fsdp_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["events"] == r1["events"] == [(6, "nonfinite")]
    # Each rank's event says what its own shards hold: rank 1 names the parameter, rank 0 points away.
    assert r1["said"] == ["0.weight holds nan"] and r0["said"] == ["out of range on another rank"]
    spawn(_fsdp_resume_worker, str(tmp_path))
    for r in (0, 1):
        res = torch.load(tmp_path / f"x{r}.pt", weights_only=True)
        # The last snapshot came after the skipped step 6: one optimizer step fewer than guard steps.
        assert res["step"] > 6 and res["opt_steps"] == [res["step"] - 1], res


def _error_ratio_worker(rank: int, world: int, folder: str) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    fully_shard(model)
    opt = MicroAdam(model.parameters(), lr=1e-2, density=0.02, block_size=256, quant_block_size=32)
    # Each rank's own shard's ratio straddles 0.5 at some steps (measured: rank 1 above, rank 0 below).
    policy = GuardPolicy(max_error_ratio=0.5, auto_density=(0.01, 0.5), error_check_every=1, warmup=100)
    guard = Guard(model, opt, policy)
    g = torch.Generator().manual_seed(1)
    densities, ratios = [], []
    for _ in range(6):
        x, y = torch.randn(16, 32, generator=g), torch.randint(0, 4, (16,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        ratios.append(opt.error_feedback_norm()[0])  # this rank's shard only
        guard.step(loss)
        opt.zero_grad()
        densities.append(opt.param_groups[0]["density"])
    everyone: list = [None] * world
    torch.distributed.all_gather_object(everyone, (densities, ratios))
    if rank == 0:
        Path(folder, "densities.json").write_text(json.dumps(everyone))


@NEEDS_FSDP2
def test_error_feedback_checks_decide_alike_on_every_fsdp2_rank(tmp_path: Path) -> None:
    """error_feedback_norm() is the rank's shard's: the guard sums both norms' squares over the ranks, so
    every rank judges the whole model's ratio (one rank raised its density while the other did not,
    and the next collective aborted the process)."""
    spawn(_error_ratio_worker, str(tmp_path))
    (d0, r0), (d1, r1) = json.loads((tmp_path / "densities.json").read_text())
    assert d0 == d1, (d0, d1)
    assert max(d0) > 0.02, "the check acted (raised the density) at some step"
    assert r0 != r1, "the ranks' own error norms differ: the case needs the sum over ranks"
