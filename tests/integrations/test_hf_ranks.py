"""GuardCallback under a 2-rank Trainer (torchrun, gloo on CPU): the loss it judges is the loss
Trainer logs, on every rank, with token shares averaged across devices and gradient accumulation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

pytestmark = pytest.mark.distributed

_SCRIPT = r"""
import json, os, sys
import torch, transformers
from microadam import MicroAdam
from microadam.guard import GuardPolicy
from microadam.integrations.hf import GuardCallback

class LMData(torch.utils.data.Dataset):
    # Labels padded with -100 after a length that differs per sample: each rank's micro-batches hold
    # different token counts, so a share over the ranks' tokens is not a mean of each rank's.
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 100, (64, 16), generator=g)
        self.labels = self.ids.clone()
        for i in range(64):
            self.labels[i, 4 + (i * 7) % 12 :] = -100
    def __len__(self):
        return 64
    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}

torch.manual_seed(0)
cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=16)
args = transformers.TrainingArguments(
    output_dir=sys.argv[1], max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=int(sys.argv[2]),
    logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, ddp_backend="gloo",
    average_tokens_across_devices=True, disable_tqdm=True, seed=0,
)
cb = GuardCallback(GuardPolicy(spike_window=1, warmup=1))
seen = []

class Record(transformers.TrainerCallback):
    def on_optimizer_step(self, args, state, control, **kwargs):
        seen.append(cb.guard.losses[-1])

trainer = transformers.Trainer(
    model=transformers.GPT2LMHeadModel(cfg), args=args, train_dataset=LMData(),
    optimizer_cls_and_kwargs=(MicroAdam, {"lr": 1e-3}), callbacks=[cb, Record()],
)
trainer.train()
logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
weights = sum(float(p.double().sum()) for p in trainer.model.parameters())
# A file per rank: the ranks' lines on one stdout pipe can interleave (a JSONDecodeError in CI).
with open(f"{sys.argv[1]}.rank{os.environ['RANK']}.json", "w") as f:
    json.dump({"rank": int(os.environ["RANK"]), "world": args.world_size, "seen": seen, "logged": logged,
               "weights": weights}, f)
# Free what holds the group and close it while both ranks live: the Trainer's DDP model holds it, and
# gloo's threads still running at interpreter exit can abort a process ("terminate called without an
# active exception", seen in a full run of the suite; tests/distributed/launch.py).
import gc
del trainer, cb
gc.collect()
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


@pytest.mark.parametrize("accumulation", [1, 2])
def test_guard_judges_the_logged_loss_on_every_rank(tmp_path, accumulation: int) -> None:
    script = tmp_path / "train.py"
    script.write_text(_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script), str(tmp_path / "out"),
           str(accumulation)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = [json.loads((tmp_path / f"out.rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["world"] == 2 and len(r["seen"]) == len(r["logged"]) == 4, r
        for judged, logged in zip(r["seen"], r["logged"]):
            assert judged == pytest.approx(logged, rel=1e-4), r
        assert all(3.5 < x < 5.0 for x in r["seen"]), "about log(100) = 4.6 per token"
    # Both ranks judged the same losses and stepped the same replicas.
    assert results[0]["seen"] == results[1]["seen"] and results[0]["weights"] == results[1]["weights"]
