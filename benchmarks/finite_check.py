"""The range check of CPU gradients: one C++ call against a torch norm per tensor.

``MicroAdam.step`` first checks that every gradient is finite and within ``GRAD_LIMIT``
(``optimizer.grads_in_range``), a pass over all of them before any state is written. For contiguous
CPU gradients of float32, bfloat16 or float16 it is one C++ call (``microadam.kernels.cpu.grads_in_range``,
a sum of absolute values per tensor); otherwise, and here as the peer, ``torch.linalg.vector_norm``
per tensor. This script alternates the two in one process, in rounds
of ``--steps`` MicroAdam steps each (the check's switch is ``microadam.kernels.cpu.loaded``), and times
the check alone (on the step's gradients, before the step) and the whole step.

Usage::

    python benchmarks/finite_check.py                        # 16M and 200 tensors of 384
    python benchmarks/finite_check.py --sizes 64M --rounds 4

Prints a Markdown table and appends one JSON line per (size, check) to ``--out``
(default ``benchmarks/results/finite_check.jsonl``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from microadam import MicroAdam, optimizer  # noqa: E402
from microadam.kernels import cpu  # noqa: E402
from step_time import GradSets, cpu_model, make_params, shapes_for  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "finite_check.jsonl"
CHECKS = ("cpp", "torch")


def measure(size: str, rounds: int, steps: int) -> list[dict[str, Any]]:
    params = make_params(shapes_for(size))
    grads = GradSets(params, 4)
    opt = MicroAdam(params, lr=1e-4)
    for _ in range(12):  # a full window
        grads.next()
        opt.step()
    real = cpu.loaded
    if not real():
        raise RuntimeError("the C++ path does not build here, so there is no C++ check to time")
    check_s: dict[str, list[float]] = {c: [] for c in CHECKS}
    step_s: dict[str, list[float]] = {c: [] for c in CHECKS}
    try:
        for _ in range(rounds):
            for check in CHECKS:
                cpu.loaded = real if check == "cpp" else (lambda: False)
                for _ in range(steps):
                    grads.next()
                    current = [p.grad for p in params]
                    t = time.perf_counter()
                    optimizer.grads_in_range(current)
                    check_s[check].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    opt.step()
                    step_s[check].append(time.perf_counter() - t)
    finally:
        cpu.loaded = real
    return [
        dict(
            size=size,
            tensors=len(params),
            numel=sum(p.numel() for p in params),
            check=check,
            check_median_ms=statistics.median(check_s[check]) * 1e3,
            step_median_ms=statistics.median(step_s[check]) * 1e3,
            samples=len(check_s[check]),
        )
        for check in CHECKS
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16M,200x384", help="comma-separated, as step_time.py's --sizes")
    parser.add_argument("--rounds", type=int, default=6, help="alternations of the two checks")
    parser.add_argument("--steps", type=int, default=10, help="steps per check and round")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        parser.error(f"--rounds and --steps must be >= 1, got {args.rounds} and {args.steps}")
    stamp = dict(
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        cpu=cpu_model(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        command=" ".join(["python", "benchmarks/finite_check.py", *(argv if argv is not None else sys.argv[1:])]),
    )
    rows = []
    for size in args.sizes.split(","):
        rows += [dict(r, **stamp) for r in measure(size.strip(), args.rounds, args.steps)]
    print(f"{stamp['cpu']}, {stamp['threads']} threads, torch {stamp['torch']}\n")
    print("| size | tensors | check | check median ms | step median ms |")
    print("|---|---:|---|---:|---:|")
    for r in rows:
        print(
            f"| {r['size']} | {r['tensors']} | {r['check']} | {r['check_median_ms']:.3f} | {r['step_median_ms']:.2f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"\nwrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
