"""MicroAdam's step time at two commits, alternated: did a change make the step faster?

Each commit's tree is taken with ``git archive`` into a temporary folder, and short timing runs of
the two alternate, one process each (each imports its own tree's ``microadam``; the C++ library is
built per source hash, so both builds coexist in the cache). A run times ``--steps`` MicroAdam steps
on the parameters of ``benchmarks/step_time.py`` (one transformer block, gradients from 4 sets in
turn, after a full window of warm-up steps) and reports their median. Alternating runs, rather
than timing one commit and then the other, gives both the same share of this shared machine's
slow and fast spells.

``--what triton-host`` times instead the host side of a ``impl="triton"`` step: the Python work
that a GPU waits for after the step's range check has synchronized it (checks, the tensors'
table rows, the tables). It runs under ``TRITON_INTERPRET=1`` on CPU tensors shaped like a LLaMA
stack of ``benchmarks/gpu.py`` (``--sizes 125M,1.3B``: 111 and 219 tensors; zeros, bf16), with the
two kernel launches replaced by no-ops and the range check by ``True``: the launches and the
check are a GPU's and are not in it.

Usage::

    python benchmarks/ab_step.py e864254 HEAD                     # 16M, 6 alternations
    python benchmarks/ab_step.py HEAD~1 HEAD --sizes 16M,200x384 --rounds 4
    python benchmarks/ab_step.py HEAD~1 HEAD --what triton-host --sizes 125M,1.3B

Prints a Markdown table (each round, then the medians and their ratio) and appends one JSON line per
size to ``--out`` (default ``benchmarks/results/ab_step.jsonl``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import cpu_model  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = HERE / "results" / "ab_step.jsonl"

# One timing run, in a child process whose PYTHONPATH is the commit's src folder.
CHILD_STEP = """
import statistics, sys, time
sys.path.insert(0, {bench!r})
from microadam import MicroAdam
from step_time import GradSets, make_params, shapes_for
params = make_params(shapes_for({size!r}))
grads = GradSets(params, 4)
opt = MicroAdam(params, lr=1e-4)
for _ in range(12):
    grads.next()
    opt.step()
times = []
for _ in range({steps}):
    grads.next()
    t = time.perf_counter()
    opt.step()
    times.append(time.perf_counter() - t)
print(statistics.median(times) * 1e3)
"""

CHILD_TRITON_HOST = """
import os, statistics, sys, time
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, {bench!r})
import torch
from microadam import MicroAdam
from microadam.kernels import triton_kernels as tk
from gpu import SIZES

class NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None

tk._compress_kernel = tk._update_kernel = NoLaunch()
params = []
for shape in SIZES[{size!r}].shapes():
    p = torch.nn.Parameter(torch.zeros(shape, dtype=torch.bfloat16))
    p.grad = torch.zeros(shape, dtype=torch.bfloat16)
    params.append(p)
opt = MicroAdam(params, lr=1e-4, impl="triton")
# The check's method by either name: _grads_in_range since the range limit, _all_finite before it.
opt._grads_in_range = opt._all_finite = lambda grads: True
for _ in range(12):
    opt.step()
times = []
for _ in range({steps}):
    t = time.perf_counter()
    opt.step()
    times.append(time.perf_counter() - t)
print(statistics.median(times) * 1e3)
"""

CHILDREN = {"step": CHILD_STEP, "triton-host": CHILD_TRITON_HOST}


def export(commit: str, into: Path) -> Path:
    """The tree of ``commit`` under ``into``; raises with git's message for an unknown commit."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True, check=False)
    if archive.returncode != 0:
        error = archive.stderr.decode().strip()
        raise SystemExit(f"git archive {commit!r} failed: {error}; pass a commit of this repository")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def time_once(tree: Path, size: str, steps: int, what: str = "step") -> float:
    code = CHILDREN[what].format(bench=str(HERE), size=size, steps=steps)
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if run.returncode != 0:
        raise SystemExit(f"a timing run of {tree} failed:\n{run.stderr[-2000:]}")
    return float(run.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="the commit to compare against (e.g. HEAD~1)")
    parser.add_argument("after", help="the commit with the change (e.g. HEAD)")
    parser.add_argument("--what", choices=sorted(CHILDREN), default="step", help="what to time (see above)")
    parser.add_argument(
        "--sizes", help="comma list: step_time.py's --sizes (default 16M), or gpu.py's stacks for triton-host (125M)"
    )
    parser.add_argument("--rounds", type=int, default=6, help="alternations: each round times both commits")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        parser.error(f"--rounds and --steps must be >= 1, got {args.rounds} and {args.steps}")
    if args.sizes is None:
        args.sizes = "125M" if args.what == "triton-host" else "16M"
    stamp = dict(
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        cpu=cpu_model(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        command=" ".join(["python", "benchmarks/ab_step.py", *(argv if argv is not None else sys.argv[1:])]),
        what=args.what,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # Keyed by role, not by commit: the same commit on both sides (a noise check) is two trees.
        trees = {
            role: export(commit, Path(tmp) / role) for role, commit in (("before", args.before), ("after", args.after))
        }
        for size in args.sizes.split(","):
            size = size.strip()
            runs: dict[str, list[float]] = {"before": [], "after": []}
            print(f"\n{size}: | round | {args.before} ms | {args.after} ms |\n|---|---:|---:|")
            for r in range(args.rounds):
                # Each commit goes first in every other round: no systematic head start for either.
                for role in ("before", "after") if r % 2 == 0 else ("after", "before"):
                    runs[role].append(time_once(trees[role], size, args.steps, args.what))
                print(f"| {r + 1} | {runs['before'][-1]:.2f} | {runs['after'][-1]:.2f} |", flush=True)
            before, after = statistics.median(runs["before"]), statistics.median(runs["after"])
            print(f"| median | {before:.2f} | {after:.2f} |\n\n{args.after} / {args.before}: {after / before:.3f}")
            rows.append(
                dict(stamp, size=size, before=args.before, after=args.after, before_ms=runs["before"],
                     after_ms=runs["after"], before_median_ms=before, after_median_ms=after, ratio=after / before)
            )  # fmt: skip
            # Written as each size ends: a later failure keeps what was measured.
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    print(f"\nwrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
