"""Peak transient memory of one MicroAdam step on CPU, measured as growth of the process's peak RSS.

Each measurement runs in a fresh subprocess: allocate the parameter, its gradient and the optimizer
state, record the peak RSS, take one step, record it again (``first_step``: the process's first step,
which also pays one-time costs: loading the C++ library, starting OpenMP's threads, growing the
per-thread scratch). Then steps until the window is full and once more, the last one measured alone:
the high-water mark restarted just before it (Linux, ``/proc/self/clear_refs``) less the resident set
then (``steady``: what every later step of a training run allocates at its peak). Prints a table and
writes JSONL.

    python benchmarks/transient_memory.py --numel 64M --chunks 262144,1048576,4194304 --impls torch,cpp

Each implementation is named (``impl=``): on CPU ``impl=None`` picks the C++ path, whose buffers are
per thread, while the torch path's scale with ``chunk_size``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from microadam.bench.measure import current_rss, peak_rss, release_free_memory, reset_peak_rss


def _measure(numel: int, chunk: int, dtype: str, error_rounding: str, impl: str, variant: str) -> dict:
    from microadam import MicroAdam

    dt = getattr(torch, dtype)
    p = torch.nn.Parameter(torch.randn(numel, dtype=dt))
    p.grad = torch.randn(numel, dtype=dt)
    opt = MicroAdam([p], lr=1e-4, chunk_size=chunk, error_rounding=error_rounding, impl=impl, variant=variant)
    opt._init_state(p, opt.param_groups[0])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    opt.step()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(opt.param_groups[0]["window"]):
        opt.step()
    steady = None
    if reset_peak_rss():  # Linux; elsewhere only the first step is measured
        gc.collect()
        release_free_memory()
        start = current_rss()
        reset_peak_rss()
        opt.step()
        peak = peak_rss()
        steady = None if peak is None or start is None else max(0, peak - start)
    return dict(
        numel=numel,
        chunk=chunk,
        dtype=dtype,
        error_rounding=error_rounding,
        impl=impl,
        variant=variant,
        transient_bytes=after - before,  # the process's first step (the name of earlier rows)
        steady_transient_bytes=steady,
    )


def _parse(n: str) -> int:
    mult = {"K": 2**10, "M": 2**20}
    return int(float(n[:-1]) * mult[n[-1]]) if n[-1] in mult else int(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--numel", default="64M")
    ap.add_argument("--chunks", default="262144,1048576,4194304")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--impls", default="torch,cpp", help="implementations to measure (impl=)")
    ap.add_argument("--variant", default="release", help="MicroAdam variant (release: the default; paper)")
    # Next to this script, wherever it is run from (a cwd-relative default lost a finished run's rows).
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "transient_memory.jsonl"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        numel, chunk, dtype, rounding, impl, variant = args.child.split(":")
        print(json.dumps(_measure(int(numel), int(chunk), dtype, rounding, impl, variant)))
        return
    numel = _parse(args.numel)
    rows = []
    print(
        "| impl | numel | dtype | error rounding | chunk | first step MiB | bytes per chunk element | "
        "steady step MiB | % of the parameter's bytes |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    cases = [
        (impl, dtype, rounding, chunk)
        for impl in args.impls.split(",")
        for dtype in args.dtypes.split(",")
        for rounding in ("nearest", "stochastic")
        for chunk in (_parse(c) for c in args.chunks.split(","))
    ]
    for impl, dtype, rounding, chunk in cases:
        out = subprocess.run(
            [sys.executable, __file__, "--child", f"{numel}:{chunk}:{dtype}:{rounding}:{impl}:{args.variant}"],
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row.update(
            torch=torch.__version__,
            python=platform.python_version(),
            machine=platform.machine(),
            threads=torch.get_num_threads(),
            date=time.strftime("%Y-%m-%d"),
            command=" ".join(sys.argv),
        )
        rows.append(row)
        steady = row["steady_transient_bytes"]
        param_bytes = numel * getattr(torch, dtype).itemsize
        print(
            f"| {impl} | {numel:,} | {dtype} | {rounding} | {chunk:,} | {row['transient_bytes'] / 2**20:.1f} | "
            f"{row['transient_bytes'] / chunk:.1f} | "
            + ("n/a | n/a |" if steady is None else f"{steady / 2**20:.2f} | {100 * steady / param_bytes:.2f} |")
        )
    with open(args.out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
