"""Where the C++ step's time goes: cycles per element of each phase, from counters in the kernel.

Builds the C++ step with its phase counters (``MICROADAM_CPP_PROFILE=1``: ``-DMICROADAM_PROFILE``,
a build of its own in the cache; the default build has none), runs MicroAdam on the parameters of
``benchmarks/step_time.py`` (one transformer block of the given size, gradients from 4 sets in
turn), and prints, for each phase of a unit of work, the time per element each thread spent in it,
in TSC ticks (x86; nanoseconds elsewhere), summed over all threads and divided by the elements.
Phases, in order (``csrc/microadam_cpu.cpp``):

- ``load``: a = g + dequant(codes), and each Top-K block's largest |a|;
- ``topk``: Top-K candidates, the k-th key, the window slot;
- ``release``: the released error feedback's per-quantization-block scales;
- ``quant``: min/max, bounds, 4-bit codes;
- ``moments``: the window scan (first and second moment sums);
- ``divide``: square root and division at the window's positions;
- ``update``: the parameter update (dense with weight decay or release).

The software prefetch of the next unit's data is spread over the phases, so a phase's time includes
its share of waiting for memory. With more than one Top-K block per unit (blocks smaller than 4096
at the default quantization block), a block's update is counted in the next block's ``moments``.

Usage::

    python benchmarks/cpu_phases.py                      # 16M parameters, default MicroAdam
    python benchmarks/cpu_phases.py --size 1M --variant paper --steps 50

Prints a Markdown table and appends one JSON line per run to ``--out``
(default ``benchmarks/results/cpu_phases.jsonl``).
"""

from __future__ import annotations

import os

# Before microadam.kernels.cpu is imported: its build flags are read at import.
os.environ["MICROADAM_CPP_PROFILE"] = "1"

import argparse  # noqa: E402
import ctypes  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from microadam import MicroAdam  # noqa: E402
from microadam.kernels import cpu  # noqa: E402
from step_time import GradSets, cpu_model, make_params, shapes_for  # noqa: E402

PHASES = ("load", "topk", "release", "quant", "moments", "divide", "update")
ELEMENTS = 15  # the counters' column of elements
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "cpu_phases.jsonl"
MAX_THREADS = 64


def read_counters(lib: ctypes.CDLL) -> list[list[int]]:
    """Every thread's counters (then zeroed): [thread][phase ... , elements at ELEMENTS]."""
    buf = (ctypes.c_uint64 * (16 * MAX_THREADS))()
    lib.microadam_profile_read(buf, MAX_THREADS)
    return [list(buf[16 * t : 16 * t + 16]) for t in range(MAX_THREADS)]


def run(size: str, variant: str, steps: int, warmup: int) -> dict[str, Any]:
    params = make_params(shapes_for(size))
    grads = GradSets(params, 4)
    opt = MicroAdam(params, lr=1e-4, variant=variant, impl="cpp")
    for _ in range(warmup):
        grads.next()
        opt.step()
    lib, _ = cpu._library()
    if not hasattr(lib, "microadam_profile_read"):
        raise RuntimeError("the loaded C++ library has no phase counters; was MICROADAM_CPP_PROFILE=1 set in time?")
    read_counters(lib)  # drop the warm-up's counts
    times = []
    wall = time.perf_counter()
    for _ in range(steps):
        grads.next()
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    wall = time.perf_counter() - wall
    counts = read_counters(lib)
    elements = sum(row[ELEMENTS] for row in counts)
    per_element = {name: sum(row[i] for row in counts) / elements for i, name in enumerate(PHASES)}
    return dict(
        size=size,
        variant=variant,
        params=sum(p.numel() for p in params),
        steps=steps,
        median_step_ms=statistics.median(times) * 1e3,
        ticks_per_element=per_element,
        total_ticks_per_element=sum(per_element.values()),
        threads=torch.get_num_threads(),
        wall_s=wall,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="16M", help="parameters, as step_time.py's --sizes (default 16M)")
    parser.add_argument("--variant", default="release", choices=("release", "paper"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=12, help="at least the window (10) so that the ring is full")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    row = run(args.size, args.variant, args.steps, args.warmup)
    row.update(
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        cpu=cpu_model(),
        torch=torch.__version__,
        cpp_march=os.environ.get("MICROADAM_CPP_MARCH", "native"),
        command=" ".join(["python", "benchmarks/cpu_phases.py", *(argv if argv is not None else sys.argv[1:])]),
    )
    per = row["ticks_per_element"]
    print(
        f"{row['params'] / 1e6:.1f}M parameters, variant {row['variant']}, {row['threads']} threads, "
        f"median step {row['median_step_ms']:.2f} ms, {row['cpu']}, -march={row['cpp_march']}\n"
    )
    print("| phase | ticks per element |")
    print("|---|---:|")
    for name in PHASES:
        print(f"| {name} | {per[name]:.3f} |")
    print(f"| **all** | **{row['total_ticks_per_element']:.3f}** |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"\nwrote 1 row to {args.out}")


if __name__ == "__main__":
    main()
