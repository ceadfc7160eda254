"""MicroAdam under Lightning's ``ModelParallelStrategy`` (FSDP2), 2 processes launched by torchrun, gloo on CPU.

The LightningModule applies ``fully_shard`` in ``configure_model`` over the strategy's ``data_parallel``
mesh (``data_parallel_size=2, tensor_parallel_size=1``) and returns MicroAdam from
``configure_optimizers``. The MLP's sizes against ``block_size=64, quant_block_size=16`` make the first
weight's shards whole blocks (aligned) and every other parameter split mid-block (its state is
re-cut into the global layout at save, and the shards' exact states ride along in the ``shards``
blob: ``microadam.sharding``).

Checkpoints are Lightning's own: a ``ModelCheckpoint`` at the end of epoch 0 of an uninterrupted
2-epoch run, then a fresh Trainer resumes from it with ``fit(ckpt_path=...)``. Both of the strategy's
formats are checked:

* ``save_distributed_checkpoint=True`` (the default): a DCP folder, one file per rank; loaded with
  ``get_optimizer_state_dict`` as the template, ``dcp.load`` and ``set_optimizer_state_dict``.
* ``save_distributed_checkpoint=False``: one file of full state dicts gathered on rank 0
  (``full_state_dict=True, cpu_offload=True``), loaded on every rank with
  ``StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)`` (Lightning reads the file on
  every rank and passes the whole dict on each). With torch 2.13 and gloo this completes and is exact
  for ``torch.optim.AdamW`` and MicroAdam alike: the hang with ``broadcast_from_rank0`` on gloo that
  docs/distributed.md notes for AdamW does not occur here.

The resumed run's final weights must equal the uninterrupted run's bit for bit on each rank. Each
launch also runs ``torch.optim.AdamW`` the same way (if it fails too, the fault is Lightning's or
torch's, not MicroAdam's), and a resume whose optimizer state is dropped after loading, which must
end elsewhere: the comparison does see the optimizer state.

Checkpoints are taken at an epoch boundary on purpose: a plain DataLoader has no ``state_dict``, so a
mid-epoch resume does not continue at the batch it stopped at (Lightning warns "You're resuming from a
checkpoint that ended before the epoch ended and your dataloader is not resumable"), whatever the optimizer.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lightning")

from tests.common import NEEDS_FSDP2

from ..distributed.launch import free_port  # noqa: E402

pytestmark = [pytest.mark.distributed, NEEDS_FSDP2]

STEPS = 5  # optimizer steps per epoch and rank; the window (4 slots) has wrapped by the checkpoint

_SCRIPT = r"""
import gc, sys
from functools import partial
import torch
import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from microadam import MicroAdam, sharding

OUT, DISTRIBUTED, STEPS, BATCH = sys.argv[1], sys.argv[2] == "sharded", int(sys.argv[3]), 8
KW = dict(lr=1e-2, density=0.1, block_size=64, quant_block_size=16, window=4)


class Model(pl.LightningModule):
    def __init__(self, name):
        super().__init__()
        self.name = name
        torch.manual_seed(0)
        # Shards per rank: weight 20x16 (320 elements, 5 whole blocks: aligned), bias 20 of 40,
        # weight 6x40 (240 elements: 3.75 blocks), bias 6 of 12, weight 2x12 and bias 2 of 4 (half blocks).
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, 40), torch.nn.Tanh(), torch.nn.Linear(40, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4)
        )

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, i):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        if self.name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=1e-2)
        return MicroAdam(self.parameters(), **KW)


# What loading re-cut (sharding.LAST_RESHARD also counts the re-cuts of every state_dict(), and Lightning
# takes one from the fresh optimizer as DCP's template before it loads): counted around to_local only.
LOAD_RECUT = {"dropped_entries": 0, "requantized_elements": 0}
_to_local = sharding.to_local


def counted_to_local(*args):
    before = dict(sharding.LAST_RESHARD)
    out = _to_local(*args)
    for key in LOAD_RECUT:
        LOAD_RECUT[key] += sharding.LAST_RESHARD[key] - before[key]
    return out


sharding.to_local = counted_to_local


class ForgetOptimizerState(pl.Callback):
    # The negative control: the checkpoint is loaded, then the optimizer's state is dropped.
    def on_train_start(self, trainer, module):
        trainer.optimizers[0].state.clear()


def loader():
    g = torch.Generator().manual_seed(1)
    n = 2 * STEPS * BATCH  # Lightning's DistributedSampler gives each rank STEPS batches per epoch
    data = torch.utils.data.TensorDataset(torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=BATCH)


def aligned(model, opt):
    group = opt.param_groups[0]
    return {
        n: sharding.is_aligned(
            sharding.shard_spec(p), opt._layout_of(p.numel(), group), partial(opt._layout_of, group=group)
        )
        for n, p in model.named_parameters()
    }


def fit(name, ckpt_path=None, callbacks=()):
    strategy = ModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=DISTRIBUTED
    )
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=2, strategy=strategy, logger=False, callbacks=list(callbacks),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False, enable_model_summary=False,
    )
    model = Model(name)
    LOAD_RECUT.update(dropped_entries=0, requantized_elements=0)
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    opt = trainer.optimizers[0]
    steps = {int(opt.state[p]["step"]) for p in model.parameters()}
    return {
        "weights": {n: p.to_local().detach().clone() for n, p in model.named_parameters()},
        "global_step": trainer.global_step,
        "steps": sorted(steps),
        "recut": dict(LOAD_RECUT),
        "aligned": aligned(model, opt) if name == "microadam" else {},
    }


def main():
    results = {}
    for name in ("adamw", "microadam"):
        ckpt_dir = f"{OUT}/{name}"
        every_epoch = ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1)
        straight = fit(name, callbacks=[every_epoch])
        ckpt = f"{ckpt_dir}/epoch=0-step={STEPS}.ckpt"  # a folder (DCP) or a file (full state dicts)
        results[name] = {
            "straight": straight, "resumed": fit(name, ckpt), "forgetful": fit(name, ckpt, [ForgetOptimizerState()])
        }
    # A file per rank: the ranks' lines on one stdout pipe can interleave.
    torch.save(results, f"{OUT}/result.rank{torch.distributed.get_rank()}.pt")
    # Free what holds the group and close it while both ranks live: gloo's threads still running at
    # interpreter exit can abort a process (tests/distributed/launch.py). The last ModelCheckpoint
    # holds the last model's bound methods, and through them its FSDP state and the group.
    del every_epoch
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
"""


def _run(tmp_path, mode: str) -> list[dict]:
    script = tmp_path / "train.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    res = subprocess.run(
        [*cmd, str(script), str(tmp_path), mode, str(STEPS)], capture_output=True, text=True, timeout=300, env=env
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return [torch.load(tmp_path / f"result.rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("mode", ["sharded", "full"], ids=["distributed-checkpoint", "full-checkpoint"])
def test_model_parallel_strategy_resumes_microadam_bit_identically(tmp_path, mode):
    ranks = _run(tmp_path, mode)
    # The sizes do what they are for: one weight is whole blocks on each rank, the rest are split mid-block.
    assert set(ranks[0]["microadam"]["straight"]["aligned"].values()) == {True, False}
    mismatched = {}
    for rank, res in enumerate(ranks):
        for name in ("adamw", "microadam"):  # AdamW first: Lightning's and torch's own path
            straight, resumed, forgetful = (res[name][k] for k in ("straight", "resumed", "forgetful"))
            assert straight["global_step"] == resumed["global_step"] == 2 * STEPS, (name, rank)
            assert resumed["steps"] == straight["steps"] == [2 * STEPS], (name, rank, resumed["steps"])
            for key, w in straight["weights"].items():
                if not torch.equal(w, resumed["weights"][key]):
                    mismatched[(name, rank, key)] = (w - resumed["weights"][key]).abs().max().item()
            # Without its optimizer state the resumed run ends elsewhere: the comparison sees that state.
            assert any(not torch.equal(w, forgetful["weights"][k]) for k, w in straight["weights"].items()), name
    recut = [res["microadam"]["resumed"]["recut"] for res in ranks]
    assert not mismatched, f"resumed != uninterrupted (max abs difference): {mismatched}; re-cut at load: {recut}"
    # Same sharding at save and load: every rank took its own shards' exact states (the blob), nothing re-cut.
    assert recut == [{"dropped_entries": 0, "requantized_elements": 0}] * 2, recut
