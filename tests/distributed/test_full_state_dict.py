"""A *full* optimizer state dict under FSDP2: gathered on 2 ranks, loaded by one plain process and by 2 ranks.

``get_optimizer_state_dict(..., full_state_dict=True, cpu_offload=True)`` gathers every DTensor of the
state with an all-gather. gloo and NCCL have no int16, so the global layout's ``window_indices`` are
int32 (``microadam.sharding``); loading narrows them back to the state's int16. The block-aligned MLP
keeps the same blocks at any world size, so both continuations are the uninterrupted 2-rank run.
"""

from __future__ import annotations

import copy

import pytest
import torch

from microadam import MicroAdam
from tests.common import NEEDS_FSDP2, trained_linear_8x8

from .launch import spawn
from .test_fsdp import KW, _batches, _model
from .test_reshard import _build, _train

pytestmark = [pytest.mark.distributed, NEEDS_FSDP2]

SAVE_AT = 5


def _save_worker(rank: int, world: int, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model, opt = _build(False, world)
    _train(model, opt, _batches()[:SAVE_AT])
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rest = _train(model, opt, _batches()[SAVE_AT:])
    if rank == 0:  # cpu_offload keeps the full dicts on rank 0 only
        torch.save({"model": msd, "optim": osd, "rest": rest}, f"{out}/full.pt")


def _load_worker(rank: int, world: int, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    model, opt = _build(False, world)
    ck = torch.load(f"{out}/full.pt", weights_only=False)
    set_state_dict(
        model, opt, model_state_dict=ck["model"], optim_state_dict=ck["optim"],
        options=StateDictOptions(full_state_dict=True),
    )  # fmt: skip
    dtypes = {opt.state[p]["window_indices"].dtype for p in model.parameters()}
    rest = _train(model, opt, _batches()[SAVE_AT:])
    if rank == 0:
        torch.save({"rest": rest, "dtypes": dtypes}, f"{out}/resumed.pt")


def test_full_state_dict_from_2_ranks_loads_into_one_plain_process_and_back_into_2(tmp_path):
    from torch.distributed.checkpoint.state_dict import set_state_dict

    spawn(_save_worker, str(tmp_path))
    ck = torch.load(tmp_path / "full.pt", weights_only=False)
    # What a consolidated checkpoint is for: a plain model, no process group, no FSDP.
    model = _model(False)
    opt = MicroAdam(model.parameters(), **KW)
    set_state_dict(model, opt, model_state_dict=ck["model"], optim_state_dict=ck["optim"])
    assert {opt.state[p]["window_indices"].dtype for p in model.parameters()} == {torch.int16}
    assert {opt.state[p]["step"] for p in model.parameters()} == {SAVE_AT}
    assert _train(model, opt, _batches()[SAVE_AT:]) == ck["rest"]
    spawn(_load_worker, str(tmp_path))
    res = torch.load(tmp_path / "resumed.pt", weights_only=False)
    assert res["dtypes"] == {torch.int16}
    assert res["rest"] == ck["rest"]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _refused_broadcast_worker(rank: int, world: int, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    saved_model, saved_opt = trained_linear_8x8(48, seed=48, shard=fully_shard)
    msd, osd = get_state_dict(saved_model, saved_opt, options=StateDictOptions(full_state_dict=True))
    model, opt = trained_linear_8x8(32, seed=32, shard=fully_shard)
    (p,) = model.parameters()
    before = {k: _local(v).clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
    try:
        set_state_dict(
            model, opt, model_state_dict=msd, optim_state_dict=osd,
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
        )  # fmt: skip
        refused = None
    except ValueError as e:
        refused = str(e)
    changed = [k for k, v in before.items() if not torch.equal(v, _local(opt.state[p][k]))]
    torch.save({"refused": refused, "changed": changed}, f"{out}/refused{rank}.pt")


def test_a_refused_broadcast_load_leaves_every_ranks_state_as_it_was(tmp_path):
    """broadcast_from_rank0 copies the checkpoint into the template that the optimizer's state_dict()
    returned, tensor by tensor, before load_state_dict checks it: a template holding the live state left
    the checkpoint's values with this run's counters after a refused load. The template asked for inside
    set_state_dict is now a copy."""
    spawn(_refused_broadcast_worker, str(tmp_path))
    for rank in range(2):
        res = torch.load(tmp_path / f"refused{rank}.pt", weights_only=False)
        assert "saved with block_size=48 but this optimizer has block_size=32" in (res["refused"] or ""), res
        assert res["changed"] == [], res


def test_global_layout_indices_that_do_not_fit_int16_are_refused_not_wrapped():
    # One process, no group: the state of a sharded save as a plain dict, with an index widened to
    # int32. A value that fits is narrowed and loads; 2**16 + 3 would wrap to the valid index 3.
    model = torch.nn.Linear(64, 8)
    opt = MicroAdam(model.parameters(), **KW)
    model(torch.randn(4, 64)).square().mean().backward()
    opt.step()
    sd = copy.deepcopy(opt.state_dict())  # edited below: the entries are the optimizer's live ones
    for entry in sd["state"].values():
        entry["row_ids"] = torch.arange(8, dtype=torch.int32)  # weight (8, 64) and bias (8,): 8 rows each
        entry["window_indices"] = entry["window_indices"].to(torch.int32)
    fresh = MicroAdam(model.parameters(), **KW)
    fresh.load_state_dict(sd)
    assert fresh.state[model.weight]["window_indices"].dtype == torch.int16
    assert torch.equal(fresh.state[model.weight]["window_indices"], opt.state[model.weight]["window_indices"])
    sd["state"][0]["window_indices"][0, 0, 0] = 2**16 + 3
    with pytest.raises(ValueError, match="window_indices"):
        MicroAdam(model.parameters(), **KW).load_state_dict(sd)
