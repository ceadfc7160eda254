"""FSDP2 (fully_shard, DTensor parameters), 2 processes with gloo on CPU.

MicroAdam works on each rank's shard: Top-K blocks and quantization blocks are cut inside the local
shard, state lives on the rank that owns it, and nothing is gathered. Where every local shard is a
whole number of blocks (Shard(0) of a weight whose row count splits evenly and whose shard holds
whole blocks), the blocks are exactly a single process's blocks and training is bit-identical;
elsewhere (e.g. a 128-element bias split into 64 + 64 while one process uses one block of 128) the
selections differ and the runs agree only approximately.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from microadam import MicroAdam, state_bytes
from tests.common import NEEDS_FSDP2

from .launch import spawn

pytestmark = [pytest.mark.distributed, NEEDS_FSDP2]

KW = dict(lr=3e-3, density=0.05, block_size=512, quant_block_size=64)
STEPS = 12


def _model(bias: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128, bias=bias), torch.nn.GELU(), torch.nn.Linear(128, 64, bias=bias),
        torch.nn.GELU(), torch.nn.Linear(64, 16, bias=bias),
    )  # fmt: skip


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 64, generator=g), torch.randint(0, 16, (32,), generator=g)) for _ in range(STEPS)]


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[float]:
    losses = []
    for x, y in _batches():  # every rank sees the same batch: the averaged gradient is exactly one process's
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _worker(rank: int, world: int, out: str, bias: bool) -> None:
    from torch.distributed.fsdp import fully_shard

    model = _model(bias)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = MicroAdam(model.parameters(), **KW)
    losses = _train(model, opt)
    full = [p.full_tensor().detach().clone() for p in model.parameters()]
    torch.save({"losses": losses, "params": full, "state_bytes": state_bytes(opt)}, f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("bias", [False, True], ids=["block-aligned", "with-biases"])
def test_fsdp2_matches_a_single_process(tmp_path, bias):
    spawn(_worker, str(tmp_path), bias)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    model = _model(bias)
    opt = MicroAdam(model.parameters(), **KW)
    losses = _train(model, opt)
    one = state_bytes(opt)
    # State per rank is half of one process's (each rank keeps its shard's state only).
    assert ranks[0]["state_bytes"] + ranks[1]["state_bytes"] >= one * 0.98
    assert max(r["state_bytes"] for r in ranks) <= 0.55 * one
    if not bias:
        assert ranks[0]["losses"] == losses
        for a, b in zip(ranks[0]["params"], model.parameters()):
            assert torch.equal(a, b.detach())
    else:
        # The biases' blocks differ (64 + 64 against 128): stated tolerance on the loss curve.
        for a, b in zip(ranks[0]["losses"], losses):
            assert abs(a - b) <= 0.02 * abs(b), (ranks[0]["losses"], losses)


def _ckpt_worker(rank: int, world: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    def build() -> tuple[torch.nn.Module, MicroAdam]:
        model = _model(True)
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        return model, MicroAdam(model.parameters(), **KW)

    batches = _batches()
    model, opt = build()
    straight = []
    for x, y in batches:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        straight.append(loss.item())
    # Again, stopping after 5 steps: per-rank checkpoint files, loaded into fresh objects.
    model, opt = build()
    resumed = []
    for i, (x, y) in enumerate(batches):
        if i == 5:
            torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, f"{out}/ckpt{rank}.pt")
            dist.barrier()
            model, opt = build()
            # weights_only=True (torch.load's default since torch 2.6): the state must hold nothing else.
            ck = torch.load(f"{out}/ckpt{rank}.pt", weights_only=True)
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optim"])
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        resumed.append(loss.item())
    # The other rank's file: refused, nothing changed.
    other = torch.load(f"{out}/ckpt{1 - rank}.pt", weights_only=True)
    try:
        opt.load_state_dict(other["optim"])
        refused = ""
    except ValueError as e:
        refused = str(e)
    torch.save({"straight": straight, "resumed": resumed, "refused": refused}, f"{out}/result{rank}.pt")


def test_fsdp2_per_rank_checkpoint_resumes_exactly_and_refuses_another_shard(tmp_path):
    spawn(_ckpt_worker, str(tmp_path))
    for r in (0, 1):
        res = torch.load(tmp_path / f"result{r}.pt", weights_only=True)
        assert res["resumed"] == res["straight"]
        assert "saved by another rank" in res["refused"]


def _out_of_range_worker(rank: int, world: int, out: str) -> None:
    import warnings

    from torch.distributed.fsdp import fully_shard

    model = _model(True)
    fully_shard(model)
    opt = MicroAdam(model.parameters(), **KW)
    batches = _batches()[:3]
    messages = []
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if i == 2:
            if rank == 1:  # in this rank's shard only: rank 0's gradients are in range
                model[2].weight.grad.to_local()[0, 0] = 3e38
            before = [p.to_local().clone() for p in model.parameters()]
            before += [v.clone() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        messages += [str(w.message) for w in caught]
    after = [p.to_local().clone() for p in model.parameters()]
    after += [v.clone() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    unchanged = all(torch.equal(a, b) for a, b in zip(before, after))
    torch.save({"skipped": opt.skipped_steps, "messages": messages, "unchanged": unchanged}, f"{out}/range{rank}.pt")


def test_a_gradient_beyond_the_limit_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """Rank 1's shard holds 3e38 (finite, beyond GRAD_LIMIT): both ranks skip the step, nothing changes on
    either, rank 1's warning names the parameter and the value, and rank 0's says it was another rank."""
    spawn(_out_of_range_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"range{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["skipped"] == r1["skipped"] == 1 and r0["unchanged"] and r1["unchanged"]
    assert len(r1["messages"]) == 1 and "parameter 2 (shape (64, 128)) holds 3e+38" in r1["messages"][0]
    assert len(r0["messages"]) == 1 and "a gradient on another rank" in r0["messages"][0], r0["messages"]
