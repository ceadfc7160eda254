"""torch.distributed.checkpoint with FSDP2: save on 2 ranks, load on 1 and on 2, continue training.

The block-aligned model's shards hold whole blocks, so its state is saved and loaded without any
re-cutting and every continuation is bit-identical to the uninterrupted run. The model with biases
has 1-D tensors split mid-block: their state is re-cut through the global layout (entries kept at
their elements, error feedback re-quantized) and the shards' exact states ride along, so a load on
the same 2 ranks is bit-identical and a load on 1 rank agrees within a stated tolerance (2%).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from microadam import MicroAdam, sharding
from tests.common import NEEDS_FSDP2

from .launch import spawn
from .test_fsdp import KW, _batches, _model

pytestmark = [pytest.mark.distributed, NEEDS_FSDP2]

SAVE_AT = 5


def _shard(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 on each Linear, then on the whole model (its parameters become DTensor shards)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _build(bias: bool, world: int) -> tuple[torch.nn.Module, MicroAdam]:
    model = _shard(_model(bias))
    return model, MicroAdam(model.parameters(), **KW)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, batches: list) -> list[float]:
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _options(flat: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # flatten_optimizer_state_dict: one key per value, keyed by parameter name (torchtitan, OLMo-core).
    return StateDictOptions(flatten_optimizer_state_dict=flat)


def _save_worker(rank: int, world: int, out: str, bias: bool, flat: bool = False) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    batches = _batches()
    model, opt = _build(bias, world)
    _train(model, opt, batches[:SAVE_AT])
    msd, osd = get_state_dict(model, opt, options=_options(flat))
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=f"{out}/ckpt")
    rest = _train(model, opt, batches[SAVE_AT:])
    if rank == 0:
        with open(f"{out}/straight.json", "w") as f:
            json.dump(rest, f)


def _load_worker(rank: int, world: int, out: str, bias: bool, flat: bool = False) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt = _build(bias, world)
    msd, osd = get_state_dict(model, opt, options=_options(flat))
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=f"{out}/ckpt")
    sharding.LAST_RESHARD.update(dropped_entries=0, requantized_elements=0)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"], options=_options(flat))
    recut = dict(sharding.LAST_RESHARD)
    steps = {opt.state[p]["step"] for p in model.parameters()}
    rest = _train(model, opt, _batches()[SAVE_AT:])
    if rank == 0:
        with open(f"{out}/resumed-{world}.json", "w") as f:
            json.dump({"losses": rest, "recut": recut, "steps": sorted(steps)}, f)


@pytest.mark.parametrize("flat", [False, True], ids=["nested", "flattened"])
@pytest.mark.parametrize("bias", [False, True], ids=["block-aligned", "with-biases"])
def test_dcp_checkpoint_from_2_ranks_loads_on_1_and_2(tmp_path, bias, flat):
    spawn(_save_worker, str(tmp_path), bias, flat, world=2)
    straight = json.loads((tmp_path / "straight.json").read_text())
    for world in (2, 1):
        spawn(_load_worker, str(tmp_path), bias, flat, world=world)
        res = json.loads((tmp_path / f"resumed-{world}.json").read_text())
        assert res["steps"] == [SAVE_AT]
        if not bias:
            # Whole blocks everywhere: nothing re-cut, and the continuation is the same run.
            assert res["recut"] == {"dropped_entries": 0, "requantized_elements": 0}
            assert res["losses"] == straight, (world, res["losses"], straight)
        elif world == 2 and not flat:
            # Same sharding as the save: each rank takes its own shards' exact state from the "shards"
            # blob, so nothing is re-cut and the continuation is the same run.
            assert res["recut"] == {"dropped_entries": 0, "requantized_elements": 0}
            assert res["losses"] == straight, (world, res["losses"], straight)
        elif world == 2:
            # A flattened state dict has no "shards" blob (torch flattens no bytes): the same sharding
            # re-cuts the biases' global-layout state into its half-tensor blocks, which re-quantizes
            # rank 0's half of each (64 + 32 + 8 elements), so the continuation agrees within a tolerance.
            assert res["recut"] == {"dropped_entries": 0, "requantized_elements": (128 + 64 + 16) // 2}
            assert res["losses"] != straight
            for a, b in zip(res["losses"], straight):
                assert abs(a - b) <= 0.02 * abs(b), (world, res["losses"], straight)
        else:
            # One rank holds whole tensors and takes the biases' state re-cut into whole-tensor blocks
            # at save time (nothing more to re-cut at load); their blocks differ from the 2-rank
            # run's half-tensor blocks, so the continuation agrees within a tolerance.
            assert res["recut"]["requantized_elements"] == 0, res["recut"]
            for a, b in zip(res["losses"], straight):
                assert abs(a - b) <= 0.02 * abs(b), (world, res["losses"], straight)


def _mismatch_worker(rank: int, world: int, out: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard

    model = _model(False)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = MicroAdam(model.parameters(), **{**KW, "density": 0.1})
    msd, osd = get_state_dict(model, opt)
    try:
        dcp.load({"model": msd, "optim": osd}, checkpoint_id=f"{out}/ckpt")
        err = ""
    except BaseException as e:  # DCP's CheckpointException (a BaseException) collects every rank's failure
        err = str(e)
    if rank == 0:
        with open(f"{out}/mismatch.txt", "w") as f:
            f.write(err)


def test_dcp_checkpoint_with_another_density_is_refused(tmp_path):
    # The window's shape depends on density (k per block), so DCP itself refuses, naming the key.
    spawn(_save_worker, str(tmp_path), False, world=2)
    spawn(_mismatch_worker, str(tmp_path), world=2)
    err = (tmp_path / "mismatch.txt").read_text()
    assert "window_indices" in err and "Size mismatch" in err, err


@pytest.mark.parametrize(
    ("bias", "flat"), [(False, False), (True, False), (True, True)], ids=["block-aligned", "with-biases", "flattened"]
)
def test_dcp_checkpoint_from_1_rank_reshards_onto_2(tmp_path, bias, flat):
    # The other direction: whole tensors saved by one rank are cut into two ranks' shards at load.
    spawn(_save_worker, str(tmp_path), bias, flat, world=1)
    straight = json.loads((tmp_path / "straight.json").read_text())
    spawn(_load_worker, str(tmp_path), bias, flat, world=2)
    res = json.loads((tmp_path / "resumed-2.json").read_text())
    assert res["steps"] == [SAVE_AT]
    if not bias:
        # Each half of a whole-block tensor is whole blocks: taken as saved, the same run as on 1 rank.
        assert res["recut"] == {"dropped_entries": 0, "requantized_elements": 0}
        assert res["losses"] == straight, (res["losses"], straight)
    else:
        # Rank 0 re-cuts its half of each bias (128, 64 and 16 elements) into its own blocks.
        assert res["recut"]["requantized_elements"] == (128 + 64 + 16) // 2, res["recut"]
        for a, b in zip(res["losses"], straight):
            assert abs(a - b) <= 0.02 * abs(b), (res["losses"], straight)
