"""DTensor placements MicroAdam cannot checkpoint are refused when the optimizer is built."""

from __future__ import annotations

import pytest
import torch

from microadam import MicroAdam
from tests.common import NEEDS_FSDP2

from .launch import spawn

pytestmark = [pytest.mark.distributed, NEEDS_FSDP2]


def _worker(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    w = torch.nn.Parameter(distribute_tensor(torch.randn(8, 64), mesh, [Shard(1)]))
    # Tensor parallelism's column sharding trained and then failed at the first state_dict().
    with pytest.raises(NotImplementedError, match=r"placements.*Shard\(dim=1\).*Shard\(0\)"):
        MicroAdam([w], lr=1e-2)
    opt = MicroAdam([torch.nn.Parameter(torch.zeros(3))], lr=1e-2)
    with pytest.raises(NotImplementedError, match="tensor parallelism"):
        opt.add_param_group({"params": [w]})
    assert len(opt.param_groups) == 1, "a refused group leaves no trace"
    # What FSDP2 makes (Shard(0)) and a replicated DTensor are taken.
    for placement in (Shard(0), Replicate()):
        MicroAdam([torch.nn.Parameter(distribute_tensor(torch.randn(8, 64), mesh, [placement]))], lr=1e-2)


def test_unsupported_placements_are_refused_at_construction() -> None:
    spawn(_worker)
