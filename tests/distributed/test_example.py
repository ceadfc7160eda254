"""examples/fsdp_train.py under torchrun: 2 ranks save a DCP checkpoint, 1 rank resumes from it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fsdp_train.py"
SMALL = ["--d-model", "64", "--layers", "1", "--context", "32", "--batch", "4"]


def _torchrun(nproc: int, *args: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", str(EXAMPLE), *SMALL, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def test_example_saves_on_2_ranks_and_resumes_on_1(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    out2 = _torchrun(2, "--steps", "6", "--ckpt", ckpt)
    per_rank = [int(b.replace(",", "")) for b in re.findall(r"optimizer state ([\d,]+) bytes", out2)]
    assert len(per_rank) == 2, out2
    out1 = _torchrun(1, "--steps", "9", "--resume", "--ckpt", ckpt)
    assert "resumed from" in out1 and "at step 6" in out1, out1
    # The resumed run trains steps 6..8 only, and one rank holds what two held.
    assert "step    5" not in out1 and "step    8" in out1, out1
    whole = [int(b.replace(",", "")) for b in re.findall(r"optimizer state ([\d,]+) bytes", out1)]
    # Each rank holds about half; a bit more, as tiny shards round k up per block (a small model).
    assert len(whole) == 1 and all(0.5 * whole[0] <= b <= 0.53 * whole[0] for b in per_rank), (whole, per_rank)
