"""GuardCallback under a 2-process Lightning DDP run (torchrun, gloo on CPU): a loss spike on one rank is judged
on the loss averaged over the ranks, and both ranks roll back to the same snapshot together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")

pytestmark = pytest.mark.distributed

_SCRIPT = r"""
import json, sys
import torch
import lightning.pytorch as pl
from microadam import MicroAdam
from microadam.guard import GuardPolicy
from microadam.integrations.lightning import GuardCallback

class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    def training_step(self, batch, i):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if self.global_step == 12 and self.global_rank == 0 and sys.argv[2] == "spike":
            loss = loss * 1000  # on one rank only
        return loss
    def configure_optimizers(self):
        return MicroAdam(self.parameters(), lr=1e-2)

class Report(pl.Callback):
    def on_train_end(self, trainer, module):
        weights = [p.detach().double().reshape(-1).tolist() for p in module.parameters()]
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        # A file per rank: the ranks' lines on one stdout pipe can interleave.
        out = f"{sys.argv[1]}.rank{trainer.global_rank}.json"
        open(out, "w").write(json.dumps({"rank": trainer.global_rank, "weights": weights, "lr": lr}))

def main():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin()), batch_size=16)
    policy = GuardPolicy(spike_window=5, warmup=5, snapshot_every=4, spike_patience=1, log_path=sys.argv[1])
    trainer = pl.Trainer(max_steps=20, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                         callbacks=[GuardCallback(policy), Report()], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Model(), loader)
    # Free what holds the group and close it while both ranks live: gloo's threads still running at
    # interpreter exit can abort a process (tests/distributed/launch.py).
    import gc
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()

if __name__ == "__main__":
    main()
"""


def _run(tmp_path, mode: str) -> tuple[list[dict], list[dict]]:
    script = tmp_path / "train.py"
    script.write_text(_SCRIPT)
    log = tmp_path / f"guard-{mode}.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script), str(log), mode],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = [json.loads(Path(f"{log}.rank{r}.json").read_text()) for r in range(2)]
    events = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return results, events


def test_a_spike_on_one_rank_rolls_back_every_rank_together(tmp_path) -> None:
    results, events = _run(tmp_path, "spike")
    # Rank 0 alone logs; the spike it saw is the mean over both ranks' losses.
    assert [e["event"] for e in events] == ["loss_spike"], events
    assert events[0]["step"] == 13 and events[0]["result"]["rolled_back_to_step"] == 12, events
    assert results[0]["weights"] == results[1]["weights"], "the replicas diverged"
    assert results[0]["lr"] == results[1]["lr"] == pytest.approx(5e-3), "lower_lr on every rank"
    clean, quiet = _run(tmp_path, "clean")
    assert quiet == [] and clean[0]["weights"] == clean[1]["weights"]
    assert clean[0]["weights"] != results[0]["weights"], "the rolled-back run took another path"
