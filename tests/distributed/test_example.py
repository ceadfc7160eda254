"""examples/fsdp_train.py under torchrun: 2 ranks save a DCP checkpoint, 1 rank resumes from it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.common import NEEDS_FSDP2

pytestmark = [pytest.mark.distributed, NEEDS_FSDP2]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fsdp_train.py"
SMALL = ["--d-model", "64", "--layers", "1", "--context", "32", "--batch", "4"]


def _torchrun(nproc: int, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", str(EXAMPLE), *SMALL, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    # torchrun exits 1 when a worker fails, whatever the worker's own status (2 here).
    assert (res.returncode == 0) == ok, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _errors(stderr: str) -> list[str]:
    """The example's own error lines (torchrun adds its summary of the failed workers after them)."""
    return [line for line in stderr.splitlines() if line.startswith("fsdp_train.py: error:")]


def test_example_saves_on_2_ranks_and_resumes_on_1(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    out2 = _torchrun(2, "--steps", "6", "--ckpt", ckpt).stdout
    per_rank = [int(b.replace(",", "")) for b in re.findall(r"optimizer state ([\d,]+) bytes", out2)]
    assert len(per_rank) == 2, out2
    out1 = _torchrun(1, "--steps", "9", "--resume", "--ckpt", ckpt).stdout
    assert "resumed from" in out1 and "at step 6" in out1, out1
    # The resumed run trains steps 6..8 only, and one rank holds what two held.
    assert "step    5" not in out1 and "step    8" in out1, out1
    whole = [int(b.replace(",", "")) for b in re.findall(r"optimizer state ([\d,]+) bytes", out1)]
    # Each rank holds about half; a bit more, as tiny shards round k up per block (a small model).
    assert len(whole) == 1 and all(0.5 * whole[0] <= b <= 0.53 * whole[0] for b in per_rank), (whole, per_rank)


def test_resume_refuses_to_rewind_the_checkpoint_or_a_missing_one(tmp_path):
    """--steps at or below the checkpoint's step would save the smaller step over it: refused, one line."""
    ckpt = tmp_path / "ckpt"
    _torchrun(1, "--steps", "3", "--ckpt", str(ckpt))
    saved = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    for steps in ("3", "2"):
        res = _torchrun(2, "--steps", steps, "--resume", "--ckpt", str(ckpt), ok=False)
        assert _errors(res.stderr) == [
            f"fsdp_train.py: error: --steps {steps} does not go beyond step 3 of the checkpoint in {str(ckpt)!r}; "
            "--steps is the step to train up to, so pass more than 3"
        ], res.stderr[-3000:]
        assert "Traceback" not in res.stderr.split("fsdp_train.py: error:")[0], res.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == saved
    # A missing folder is caught before the process group starts: no torchrun needed to see it.
    cmd = [sys.executable, str(EXAMPLE), "--resume", "--ckpt", str(tmp_path / "nope")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and _errors(res.stderr) == [res.stderr.strip()], res.stderr
    assert "holds no checkpoint" in res.stderr and "leave out --resume" in res.stderr
