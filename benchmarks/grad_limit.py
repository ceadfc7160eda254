"""How large the state grows under gradients at ``GRAD_LIMIT`` (2**100), the largest a step takes.

A gradient beyond the limit is skipped like a NaN (``optimizer.GRAD_LIMIT``). Within it, the error
feedback can accumulate what Top-K leaves behind, and a block's quantization bounds are rounded
outward to bfloat16 at every step, so the state may grow past the gradient. This script measures
by how much: one tensor of one Top-K block with k = 1 (the fewest entries leave the error feedback
per step), a constant gradient of +2**100 every step (nothing cancels), for ``--steps`` steps, and
prints log2 of the largest error-feedback bound and window value at a few steps (float32 overflows
at log2 = 128), and whether the state and the parameter stayed finite.

Usage::

    python benchmarks/grad_limit.py                  # 40,000 steps, paper and release, blocks of 4096 and 32768

Appends one JSON line per (variant, block) to ``--out`` (default ``benchmarks/results/grad_limit.jsonl``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from microadam import MicroAdam  # noqa: E402
from microadam.optimizer import GRAD_LIMIT  # noqa: E402
from step_time import cpu_model  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "grad_limit.jsonl"


def measure(variant: str, block: int, steps: int, marks: list[int]) -> dict[str, Any]:
    p = torch.nn.Parameter(torch.zeros(block))
    opt = MicroAdam([p], lr=1e-3, variant=variant, block_size=block, density=1 / block)
    g = torch.full((block,), GRAD_LIMIT)
    seen = []
    for t in range(1, steps + 1):
        p.grad = g
        opt.step()
        if t in marks or t == steps:
            st = opt.state[p]
            bound = st["error_bounds"].float().abs().max().item()
            window = st["window_values"].float().abs().max().item()
            seen.append([t, math.log2(bound) if bound else None, math.log2(window) if window else None])
    floats = [v for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return dict(
        variant=variant,
        block=block,
        k=opt.layout(p, opt.param_groups[0]).k,
        steps=steps,
        log2_at=seen,
        log2_max_bound=max(b for _, b, _ in seen if b is not None),
        log2_max_window=max(w for _, _, w in seen if w is not None),
        state_finite=all(bool(torch.isfinite(v.float()).all()) for v in floats),
        param_finite=bool(torch.isfinite(p).all()),
        skipped_steps=opt.skipped_steps,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40000)
    parser.add_argument("--variants", default="paper,release")
    parser.add_argument("--blocks", default="4096,32768", help="Top-K block sizes (one block each, k = 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    marks = [m for m in (10, 100, 1000, 5000, 10000, 20000) if m < args.steps]
    stamp = dict(
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        cpu=cpu_model(),
        torch=torch.__version__,
        command=" ".join(["python", "benchmarks/grad_limit.py", *(argv if argv is not None else sys.argv[1:])]),
    )
    rows = []
    for variant in args.variants.split(","):
        for block in (int(b) for b in args.blocks.split(",")):
            rows.append(dict(measure(variant.strip(), block, args.steps, marks), **stamp))
            print(f"[{variant} {block}] done", file=sys.stderr, flush=True)
    print(f"gradient +2**100 every step, {args.steps} steps; log2 of the largest value (float32 overflows at 128)\n")
    print("| variant | block | k | max error bound (log2) | max window value (log2) | state finite | param finite |")
    print("|---|---:|---:|---:|---:|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['block']} | {r['k']} | {r['log2_max_bound']:.2f} | {r['log2_max_window']:.2f} "
            f"| {r['state_finite']} | {r['param_finite']} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"\nwrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
