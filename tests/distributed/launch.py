"""Start a test body in N gloo processes on this machine, and shut the group down safely."""

from __future__ import annotations

import gc
import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn: Callable[..., None], *args: Any, world: int = 2) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` processes joined by one gloo process group."""
    mp.spawn(_entry, args=(fn, world, free_port(), args), nprocs=world, join=True)


def _entry(rank: int, fn: Callable[..., None], world: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        fn(rank, world, *args)
    finally:
        # FSDP2's DTensors hold the process group. If any outlive destroy_process_group, gloo's
        # worker threads are still running at interpreter exit and one of them can abort the
        # process ("terminate called without an active exception"; seen in CI about once in 30
        # runs). fn has returned, so its objects are garbage: free them while the group lives.
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
