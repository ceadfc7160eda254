"""accelerate with FSDP2: what its ``prepare`` does to the optimizer, and its checkpoint functions.

accelerate runs FSDP only on accelerators (a CPU run becomes ``MULTI_CPU``, without FSDP), so this
cannot launch it here. It runs instead, on 2 gloo processes, the two things accelerate does to an
optimizer under FSDP2, with accelerate's own code where it is a function:

* ``Accelerator.prepare`` takes an optimizer built on the unsharded model, swaps each of its
  parameters for a 1-element placeholder, shards the model with ``fully_shard``, then puts the
  sharded DTensor parameters in place (``fsdp2_switch_optimizer_parameters``): MicroAdam sees its
  param groups' tensors replaced after it was built.
* ``Accelerator.save_state`` / ``load_state`` call ``save_fsdp_optimizer`` / ``load_fsdp_optimizer``
  with the plugin's state dict type: a DCP checkpoint (``SHARDED_STATE_DICT``, the default), or
  per-rank ``torch.save`` files (``use_dcp=False``).

The model has biases split mid-block (see ``tests/distributed/test_reshard.py``), so the sharded
state dict takes its gather-and-re-cut path as well as the aligned one. Every continuation must be
the uninterrupted run, bit for bit.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch

pytest.importorskip("accelerate", reason="accelerate is in the 'integrations' extra")

from microadam import MicroAdam  # noqa: E402
from tests.common import NEEDS_FSDP2

from ..distributed.launch import spawn  # noqa: E402
from ..distributed.test_fsdp import KW, _batches, _model  # noqa: E402
from ..distributed.test_reshard import _build, _shard, _train  # noqa: E402

pytestmark = [pytest.mark.distributed, NEEDS_FSDP2]

SAVE_AT = 5


def _prepared() -> tuple[torch.nn.Module, MicroAdam]:
    """The model and optimizer as ``Accelerator.prepare`` leaves them under FSDP2."""
    from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters

    model = _model(True)
    opt = MicroAdam(model.parameters(), **KW)  # built first, on the unsharded model, as users do
    names = {id(p): n for n, p in model.named_parameters()}
    old_names = []
    for group in opt.param_groups:  # accelerate's placeholders, keyed by the old parameter's data_ptr
        for i, p in enumerate(group["params"]):
            old_names.append((p.data_ptr(), names[id(p)]))
            group["params"][i] = torch.empty(1, dtype=p.dtype, device=p.device)
            group["params"][i].data_ptr = p.data_ptr()
    new = dict(_shard(model).named_parameters())
    fsdp2_switch_optimizer_parameters(opt, {ptr: new[name] for ptr, name in old_names})
    return model, opt


def _plugin(state_dict_type: str) -> Any:
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type=state_dict_type)


def _worker(rank: int, world: int, out: str, use_dcp: bool) -> None:
    from accelerate import PartialState
    from accelerate.utils.fsdp_utils import load_fsdp_model, load_fsdp_optimizer, save_fsdp_model, save_fsdp_optimizer

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))  # as torchrun sets them
    batches = _batches()
    # What accelerate's checkpoint functions use of the Accelerator (process_index, wait_for_everyone,
    # its logging), on the process group the launcher made.
    acc, plugin = PartialState(cpu=True), _plugin("SHARDED_STATE_DICT")
    assert (acc.process_index, acc.num_processes) == (rank, world)
    model, opt = _prepared()
    assert all(type(p).__name__ == "DTensor" for g in opt.param_groups for p in g["params"])
    first = _train(model, opt, batches[:SAVE_AT])
    save_fsdp_model(plugin, acc, model, out, use_dcp=use_dcp)
    save_fsdp_optimizer(plugin, acc, opt, model, out, use_dcp=use_dcp)
    straight = _train(model, opt, batches[SAVE_AT:])

    model, opt = _prepared()
    load_fsdp_model(plugin, acc, model, out, use_dcp=use_dcp)
    load_fsdp_optimizer(plugin, acc, opt, model, out, use_dcp=use_dcp)
    steps = sorted({opt.state[p]["step"] for p in model.parameters()})
    resumed = _train(model, opt, batches[SAVE_AT:])
    with open(f"{out}/result-{rank}.json", "w") as f:
        json.dump({"first": first, "straight": straight, "resumed": resumed, "steps": steps}, f)


def _reference(rank: int, world: int, out: str) -> None:
    """MicroAdam built on the sharded model, as in tests/distributed: what prepare must amount to."""
    losses = _train(*_build(True, world), _batches())
    with open(f"{out}/reference-{rank}.json", "w") as f:
        json.dump(losses, f)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[list[float]]:
    out = tmp_path_factory.mktemp("reference")
    spawn(_reference, str(out))
    return [json.loads((out / f"reference-{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize("use_dcp", [True, False], ids=["dcp", "per-rank-files"])
def test_accelerate_fsdp2_prepare_and_checkpoint_resume_exactly(tmp_path, use_dcp, reference):
    spawn(_worker, str(tmp_path), use_dcp)
    for rank in (0, 1):
        res = json.loads((tmp_path / f"result-{rank}.json").read_text())
        # Swapping the parameters after MicroAdam was built changes nothing: the same run.
        assert res["first"] + res["straight"] == reference[rank], (res, reference[rank])
        assert res["steps"] == [SAVE_AT]
        assert res["resumed"] == res["straight"], res
