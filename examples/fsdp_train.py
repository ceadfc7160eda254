"""FSDP2 + MicroAdam with torchrun, on CPUs (gloo) or GPUs (nccl), unchanged.

    torchrun --nproc_per_node=2 examples/fsdp_train.py --steps 20
    torchrun --nproc_per_node=1 examples/fsdp_train.py --steps 20      # the one-process reference

A small causal transformer LM over bytes of a text (the King James Bible when the Debian package
bible-kjv is installed, else this file), sharded with ``fully_shard`` per layer. MicroAdam steps each
rank's shard; its state stays on that rank. Each rank prints its optimizer-state bytes; model and
optimizer are saved with ``torch.distributed.checkpoint`` (``--ckpt``), which reshards, so ``--resume``
continues at any world size:

    torchrun --nproc_per_node=2 examples/fsdp_train.py --steps 10
    torchrun --nproc_per_node=1 examples/fsdp_train.py --steps 20 --resume
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from microadam import MicroAdam, state_bytes


def _text() -> bytes:
    try:
        out = subprocess.run(["bible", "gen1:1-gen50:26"], capture_output=True, timeout=60, check=True).stdout
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    with open(__file__, "rb") as f:
        return f.read()


class LM(torch.nn.Module):
    def __init__(self, d: int, layers: int, context: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(256, d)
        self.pos = torch.nn.Embedding(context, d)
        self.blocks = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.head = torch.nn.Linear(d, 256)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) + self.pos.weight[: x.shape[1]]
        for block in self.blocks:
            h = block(h, src_mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True)
        return self.head(h)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="the step to train up to, counted from 0 (with --resume too)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ckpt", default="fsdp-ckpt")
    ap.add_argument("--resume", action="store_true", help="continue from --ckpt (saved at any world size)")
    args = ap.parse_args()
    if args.resume and not os.path.isfile(os.path.join(args.ckpt, ".metadata")):
        # Checked before the process group starts: every rank sees the same folder and stops, and
        # rank 0 alone says why, instead of one dcp.load traceback per rank.
        _fail(f"--resume: --ckpt {args.ckpt!r} holds no checkpoint (no .metadata file); give the folder a "
              "run saved with --ckpt, or leave out --resume to start from step 0")  # fmt: skip
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        train(args, cuda)
    finally:
        # The sharded model and optimizer hold the process group: free them before destroying it,
        # or gloo's threads can outlive it and abort the process at exit.
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def _fail(message: str) -> None:
    """Stop every rank with exit status 2; rank 0 prints ``message`` (torchrun sets RANK)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{os.path.basename(__file__)}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def train(args: argparse.Namespace, cuda: bool) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)  # the same initial weights on every rank
    model = LM(args.d_model, args.layers, args.context).to(device)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = MicroAdam(model.parameters(), lr=args.lr)
    start = 0
    if args.resume:
        # get_state_dict gives this world size's template; dcp.load fills it, resharding as needed.
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd, "step": torch.zeros((), dtype=torch.long)}
        dcp.load(state, checkpoint_id=args.ckpt)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = int(state["step"])
        if args.steps <= start:
            # Training would do nothing, and the save below would write step --steps over the
            # checkpoint: a later --resume would redo steps already taken. All ranks read the same step.
            _fail(
                f"--steps {args.steps} does not go beyond step {start} of the checkpoint in {args.ckpt!r}; "
                f"--steps is the step to train up to, so pass more than {start}"
            )
        if rank == 0:
            print(f"resumed from {args.ckpt} at step {start}", flush=True)

    data = torch.tensor(list(_text()), dtype=torch.long)
    gen = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        # Each rank trains on its own part of the global batch.
        starts = torch.randint(0, len(data) - args.context - 1, (world, args.batch), generator=gen)[rank]
        if step < start:
            continue
        idx = starts[:, None] + torch.arange(args.context + 1)
        x, y = data[idx[:, :-1]].to(device), data[idx[:, 1:]].to(device)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {mean.item() / world:.4f}", flush=True)

    n_local = sum(p.to_local().numel() for p in model.parameters())
    n_total = sum(p.numel() for p in model.parameters())
    sb = state_bytes(opt)
    print(
        f"rank {rank}/{world}: {n_local:,} of {n_total:,} parameters, optimizer state {sb:,} bytes "
        f"({sb / n_local:.3f} per local parameter)",
        flush=True,
    )
    msd, osd = get_state_dict(model, opt)
    # overwrite=True: a resumed run saves over the checkpoint it started from, on purpose.
    writer = dcp.FileSystemWriter(args.ckpt, overwrite=True)
    dcp.save({"model": msd, "optim": osd, "step": torch.tensor(args.steps)}, storage_writer=writer)


if __name__ == "__main__":
    main()
