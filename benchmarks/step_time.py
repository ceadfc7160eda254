"""Step time and optimizer-state memory of MicroAdam against AdamW and quantized peers.

For each size (about 1M, 16M, 64M parameters by default) the parameters are
the weights and biases of one transformer block of hidden size ``h``: fused
QKV ``[3h, h]``, attention output ``[h, h]``, MLP up ``[4h, h]`` and down
``[h, 4h]`` (12 h^2 weights) plus the QKV and MLP-up biases. Gradients are
``--grad-sets`` (default 4) sets of fixed random tensors, made once and taken
in turn, one set per step (swapping ``p.grad``, outside the timed region): with
one set repeated, MicroAdam's Top-K would pick the same positions every step
(the released error feedback keeps no residual to rotate them), which makes
its moment update cheaper than on a real run, whose gradients change. Only
``opt.step()`` is timed, after a warm-up
(at least ``window`` steps for MicroAdam so that its ring is full, and at
least 3 for the torch.compile-based torchao optimizers, whose first step
compiles). Every optimizer gets its parameters freshly built and freed
before the next one, so at most one optimizer's tensors are alive at once.

With ``--rounds R`` (R > 1) the optimizers of a size are instead timed in turn,
``--steps`` steps each per round, R rounds, on one shared set of parameters
and gradients (all optimizers alive at once). This machine's memory runs in a
fast and a slow state that can switch within a run (fused AdamW's 16M step
took 3.7 or 6.9 ms); timed one after the other, two optimizers can each meet a
different state, and their ratio says more about the switch than about them.
Interleaved, each round's ratio compares the optimizers under the same
conditions: ``ratio_vs_fused_adamw`` is then the median of the rounds' ratios
(each round's median step time against fused AdamW's in that round), and
``round_ratios`` lists them all.

Usage::

    python benchmarks/step_time.py                       # all sizes, all optimizers
    python benchmarks/step_time.py --sizes 1M --steps 10 --optimizers microadam,adamw_fused
    python benchmarks/step_time.py --sizes 200x384 --optimizers microadam,adamw_fused   # per-tensor cost
    python benchmarks/step_time.py --profile-microadam   # where MicroAdam's step time goes at 16M
    python benchmarks/step_time.py --sizes 16M --optimizers microadam,adamw_fused --rounds 10   # interleaved

Prints a Markdown table and appends one JSON line per (optimizer, size) to
``--out`` (default ``benchmarks/results/step_time.jsonl``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from microadam import MicroAdam, state_bytes

LR = 1e-4
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "step_time.jsonl"
PEER_PACKAGES = ("microadam", "bitsandbytes", "torchao")
FUSED_NAME = "adamw_fused"


class NotInstalledError(RuntimeError):
    """An optional peer optimizer's package is missing."""


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    build: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    min_warmup: int
    note: str = ""


def _bnb_adamw8bit(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise NotInstalledError("not installed: pip install bitsandbytes") from e
    return bnb.optim.AdamW8bit(params, lr=LR)


def _torchao_optim(kind: str) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    def build(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        try:
            import torchao.optim
        except ImportError as e:
            raise NotInstalledError("not installed: pip install torchao") from e
        return getattr(torchao.optim, kind)(params, lr=LR)

    return build


OPTIMIZERS: tuple[OptimizerSpec, ...] = (
    # impl=None: on CPU the C++ path when it builds (the rule of microadam.kernels.resolve_impl).
    OptimizerSpec("microadam", lambda ps: MicroAdam(ps, lr=LR), min_warmup=10, note="defaults, impl=None"),
    OptimizerSpec(
        "microadam_torch", lambda ps: MicroAdam(ps, lr=LR, impl="torch"), min_warmup=10, note="defaults, impl=torch"
    ),
    # The C++/OpenMP step (impl="cpp", CPU only); its first step includes the one-time g++ build
    # unless the per-user cache already holds it.
    OptimizerSpec(
        "microadam_cpp", lambda ps: MicroAdam(ps, lr=LR, impl="cpp"), min_warmup=10, note="defaults, impl=cpp"
    ),
    # The paper's algorithm (no released error feedback: no dense pass over the parameter).
    OptimizerSpec(
        "microadam_paper",
        lambda ps: MicroAdam(ps, lr=LR, variant="paper"),
        min_warmup=10,
        note="variant=paper, impl=None",
    ),
    OptimizerSpec("adamw_foreach", lambda ps: torch.optim.AdamW(ps, lr=LR, foreach=True), min_warmup=1),
    OptimizerSpec(FUSED_NAME, lambda ps: torch.optim.AdamW(ps, lr=LR, fused=True), min_warmup=1),
    OptimizerSpec("bnb_adamw8bit", _bnb_adamw8bit, min_warmup=1),
    OptimizerSpec("torchao_adamw8bit", _torchao_optim("AdamW8bit"), min_warmup=3, note="torch.compile"),
    OptimizerSpec("torchao_adamw4bit", _torchao_optim("AdamW4bit"), min_warmup=3, note="torch.compile"),
)


def parse_size(text: str) -> int:
    """``"16M"`` -> 16_000_000; accepts K, M, G suffixes (decimal) or a plain integer."""
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    number = text[:-1] if scale != 1 else text
    return int(float(number) * scale)


def format_count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 10**6 else f"{n / 1e3:.0f}K"


def shapes_for(size_text: str) -> list[tuple[int, ...]]:
    """A size argument's shapes: ``"16M"`` one transformer block (:func:`block_shapes`), ``"200x384"``
    200 vectors of 384 elements (a model's many small tensors: the per-tensor cost of a step)."""
    count, sep, numel = size_text.strip().lower().partition("x")
    if sep:
        return [(parse_size(numel),)] * int(count)
    return block_shapes(parse_size(size_text))


def block_shapes(target: int) -> list[tuple[int, ...]]:
    """Shapes of one transformer block's linear layers (12 h^2 weights) with h a multiple of 32."""
    h = max(32, round(math.sqrt(target / 12) / 32) * 32)
    return [(3 * h, h), (3 * h,), (h, h), (4 * h, h), (4 * h,), (h, 4 * h)]


def make_params(shapes: Iterable[tuple[int, ...]], seed: int = 0) -> list[torch.Tensor]:
    """Fresh fp32 parameters with fixed random gradients (same values for every optimizer)."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
        p.grad = torch.randn(shape, generator=gen) * 1e-3
        params.append(p)
    return params


class GradSets:
    """``n`` sets of fixed random gradients for ``params``, installed in turn by :meth:`next`.

    Set 0 is the gradient :func:`make_params` attached; the others are drawn from ``seed + 1``.
    """

    def __init__(self, params: list[torch.Tensor], n: int, seed: int = 1) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.params = params
        self.sets = [[p.grad for p in params]]
        for _ in range(n - 1):
            self.sets.append([torch.randn(p.shape, generator=gen) * 1e-3 for p in params])
        self.i = 0

    def next(self) -> None:
        self.i = (self.i + 1) % len(self.sets)
        for p, g in zip(self.params, self.sets[self.i]):
            p.grad = g


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] of already sorted values."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def free_memory() -> None:
    gc.collect()
    dynamo = getattr(torch, "_dynamo", None)
    if dynamo is not None:
        # Drop compiled graphs so torchao recompiles per size instead of hitting the recompile limit.
        dynamo.reset()


@dataclass(frozen=True)
class CpuSnapshot:
    wall: float
    busy: float  # seconds of busy CPU summed over all cores, whole machine
    own: float  # seconds of CPU used by this process (all threads)


def cpu_snapshot() -> CpuSnapshot | None:
    """Machine-wide and own CPU time, or None where ``/proc/stat`` is missing (not Linux)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    tick = os.sysconf("SC_CLK_TCK")
    t = os.times()
    return CpuSnapshot(time.perf_counter(), (user + nice + system + irq + softirq + steal) / tick, t.user + t.system)


def other_cores(before: CpuSnapshot | None, after: CpuSnapshot | None) -> float | None:
    """Average number of cores other processes kept busy between two snapshots."""
    if before is None or after is None or after.wall <= before.wall:
        return None
    other = (after.busy - before.busy) - (after.own - before.own)
    return max(0.0, other / (after.wall - before.wall))


def wait_idle(max_wait_s: float, threshold: float, window_s: float = 2.0) -> float | None:
    """Sleep until other processes use under ``threshold`` cores over ``window_s`` (at most ``max_wait_s``).

    Returns the last measured load of other processes (None without ``/proc/stat``).
    """
    deadline = time.perf_counter() + max_wait_s
    while True:
        before = cpu_snapshot()
        time.sleep(window_s)
        load = other_cores(before, cpu_snapshot())
        if load is None or load < threshold or time.perf_counter() >= deadline:
            return load


@dataclass(frozen=True)
class Noise:
    """How to cope with other processes on the machine: wait for idle, retry contaminated timings."""

    max_wait_s: float = 0.0
    retries: int = 0
    threshold: float = 0.2


def time_steps(
    opt: torch.optim.Optimizer, steps: int, noise: Noise, grads: GradSets | None = None
) -> tuple[list[float], float | None, int]:
    """Time ``steps`` steps, retrying while other processes used over ``noise.threshold`` cores.

    Returns the sorted step times (ms) of the least contaminated attempt, the
    other processes' average cores during it, and the number of attempts.
    """
    best: tuple[list[float], float | None] | None = None
    attempts = 0
    for _ in range(1 + noise.retries):
        attempts += 1
        if noise.max_wait_s > 0:
            wait_idle(noise.max_wait_s, noise.threshold)
        before = cpu_snapshot()
        times = []
        for _ in range(steps):
            if grads is not None:
                grads.next()
            t0 = time.perf_counter()
            opt.step()
            times.append((time.perf_counter() - t0) * 1e3)
        load = other_cores(before, cpu_snapshot())
        if best is None or (load is not None and (best[1] is None or load < best[1])):
            best = (sorted(times), load)
        if load is None or load <= noise.threshold:
            break
    assert best is not None
    return best[0], best[1], attempts


def measure(
    spec: OptimizerSpec,
    shapes: list[tuple[int, ...]],
    steps: int,
    warmup: int,
    noise: Noise = Noise(),
    grad_sets: int = 4,
) -> dict[str, Any]:
    """Time ``steps`` calls of ``opt.step()`` after the warm-up; return the numbers or the error."""
    params = make_params(shapes)
    grads = GradSets(params, grad_sets)
    numel = sum(p.numel() for p in params)
    row: dict[str, Any] = {"optimizer": spec.name, "numel": numel, "shapes": [list(s) for s in shapes]}
    warmup = max(warmup, spec.min_warmup)
    opt = None
    try:
        opt = spec.build(params)
        t0 = time.perf_counter()
        opt.step()
        first_ms = (time.perf_counter() - t0) * 1e3
        for _ in range(warmup - 1):
            grads.next()
            opt.step()
        times, load, attempts = time_steps(opt, steps, noise, grads)
        sbytes = state_bytes(opt)
        finite = all(bool(torch.isfinite(p).all()) for p in params)
        row.update(
            median_ms=statistics.median(times),
            p10_ms=percentile(times, 10),
            p90_ms=percentile(times, 90),
            first_step_ms=first_ms,
            warmup_steps=warmup,
            timed_steps=steps,
            state_bytes=sbytes,
            bytes_per_param=sbytes / numel,
            params_finite=finite,
            # Cores other processes kept busy while the kept attempt was timed (contamination).
            other_procs_cores=load,
            timing_attempts=attempts,
            grad_sets=grad_sets,
            error=None,
        )
    except NotInstalledError as e:
        row["error"] = str(e)
    except Exception as e:  # a peer failing on CPU is recorded, not fatal
        row["error"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    del opt, params, grads
    free_memory()
    return row


def measure_interleaved(
    specs: list[OptimizerSpec],
    shapes: list[tuple[int, ...]],
    steps: int,
    warmup: int,
    rounds: int,
    noise: Noise = Noise(),
    grad_sets: int = 4,
) -> list[dict[str, Any]]:
    """Time the optimizers in turn, ``steps`` steps each per round, on shared parameters and gradients.

    Rows as :func:`measure`'s, plus ``round_medians_ms`` (each round's median step time) and, filled
    in by the caller, ``round_ratios`` against fused AdamW's round medians.
    """
    params = make_params(shapes)
    grads = GradSets(params, grad_sets)
    numel = sum(p.numel() for p in params)
    rows: list[dict[str, Any]] = []
    live: list[tuple[dict[str, Any], torch.optim.Optimizer]] = []
    for spec in specs:
        row: dict[str, Any] = {"optimizer": spec.name, "numel": numel, "shapes": [list(s) for s in shapes]}
        rows.append(row)
        try:
            opt = spec.build(params)
            t0 = time.perf_counter()
            opt.step()
            row["first_step_ms"] = (time.perf_counter() - t0) * 1e3
            for _ in range(max(warmup, spec.min_warmup) - 1):
                grads.next()
                opt.step()
            row.update(warmup_steps=max(warmup, spec.min_warmup), error=None)
            live.append((row, opt))
        except NotInstalledError as e:
            row["error"] = str(e)
        except Exception as e:  # a peer failing on CPU is recorded, not fatal
            row["error"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    samples: dict[int, list[float]] = {id(row): [] for row, _ in live}
    medians: dict[int, list[float]] = {id(row): [] for row, _ in live}
    loads: dict[int, list[float]] = {id(row): [] for row, _ in live}
    for _ in range(rounds):
        for row, opt in list(live):
            try:
                times, load, _ = time_steps(opt, steps, noise, grads)
            except Exception as e:  # recorded, and the others go on (as in measure)
                row["error"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                live.remove((row, opt))
                continue
            samples[id(row)] += times
            medians[id(row)].append(statistics.median(times))
            if load is not None:
                loads[id(row)].append(load)
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    for row, opt in live:
        times = sorted(samples[id(row)])
        sbytes = state_bytes(opt)
        row.update(
            median_ms=statistics.median(times),
            p10_ms=percentile(times, 10),
            p90_ms=percentile(times, 90),
            timed_steps=len(times),
            rounds=rounds,
            round_medians_ms=medians[id(row)],
            state_bytes=sbytes,
            bytes_per_param=sbytes / numel,
            params_finite=finite,
            other_procs_cores=max(loads[id(row)]) if loads[id(row)] else None,
            grad_sets=grad_sets,
        )
    del live, params, grads
    free_memory()
    return rows


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PEER_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment(argv: list[str]) -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "num_threads": torch.get_num_threads(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *argv]),
        # The C++ path's build target (microadam.kernels.cpu): "native" unless overridden.
        "cpp_march": os.environ.get("MICROADAM_CPP_MARCH", "native"),
    }


def _fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| optimizer | params | median ms | p10 ms | p90 ms | x fused AdamW | bytes/param | first step ms "
        "| other procs (cores) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [header]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['optimizer']} | {format_count(r['numel'])} | {r['error']} | | | | | | |")
            continue
        lines.append(
            f"| {r['optimizer']} | {format_count(r['numel'])} | {_fmt(r['median_ms'])} | {_fmt(r['p10_ms'])} "
            f"| {_fmt(r['p90_ms'])} | {_fmt(r['ratio_vs_fused_adamw'])} | {_fmt(r['bytes_per_param'], 3)} "
            f"| {_fmt(r['first_step_ms'], 0)} | {_fmt(r['other_procs_cores'])} |"
        )
    return "\n".join(lines)


def run_benchmark(args: argparse.Namespace, argv: list[str], noise: Noise) -> list[dict[str, Any]]:
    wanted = {s.strip() for s in args.optimizers.split(",")} if args.optimizers else None
    specs = [s for s in OPTIMIZERS if wanted is None or s.name in wanted]
    if wanted is not None and (unknown := wanted - {s.name for s in OPTIMIZERS}):
        raise SystemExit(f"unknown optimizers {sorted(unknown)}; choose from {[s.name for s in OPTIMIZERS]}")
    env = environment(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    all_rows: list[dict[str, Any]] = []
    for size_text in args.sizes.split(","):
        shapes = shapes_for(size_text)
        if args.rounds > 1:
            rows = measure_interleaved(specs, shapes, args.steps, args.warmup, args.rounds, noise, args.grad_sets)
        else:
            rows = [measure(spec, shapes, args.steps, args.warmup, noise, args.grad_sets) for spec in specs]
        for row in rows:
            status = row["error"] or f"median {row['median_ms']:.2f} ms"
            print(f"[{size_text}] {row['optimizer']}: {status}", file=sys.stderr, flush=True)
        fused = next((r for r in rows if r["optimizer"] == FUSED_NAME and not r.get("error")), None)
        with args.out.open("a") as f:
            for r in rows:
                ok = fused is not None and r.get("median_ms") is not None
                r["ratio_vs_fused_adamw"] = r["median_ms"] / fused["median_ms"] if ok else None
                if ok and args.rounds > 1:
                    # Interleaved: the median of the rounds' ratios, each under one memory state.
                    ratios = [m / f for m, f in zip(r["round_medians_ms"], fused["round_medians_ms"])]
                    r["round_ratios"] = ratios
                    r["ratio_vs_fused_adamw"] = statistics.median(ratios)
                r["size_arg"] = size_text
                r.update(env)
                f.write(json.dumps(r) + "\n")
        all_rows.extend(rows)
    return all_rows


def profile_microadam(size_text: str, steps: int, noise: Noise, row_limit: int = 15) -> None:
    """Print the top ops by self CPU time over ``steps`` MicroAdam steps with a full window."""
    from torch.profiler import ProfilerActivity, profile

    params = make_params(shapes_for(size_text))
    grads = GradSets(params, 4)
    numel = sum(p.numel() for p in params)
    opt = MicroAdam(params, lr=LR)
    for _ in range(opt.defaults["window"] + 1):
        grads.next()
        opt.step()
    if noise.max_wait_s > 0:
        wait_idle(noise.max_wait_s, noise.threshold)
    before = cpu_snapshot()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            grads.next()
            opt.step()
        wall = time.perf_counter() - t0
    load = other_cores(before, cpu_snapshot())
    averages = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in averages)
    print(
        f"MicroAdam profile: {format_count(numel)} params, {steps} steps, "
        f"{wall / steps * 1e3:.1f} ms/step wall (profiled), {torch.get_num_threads()} threads, "
        f"other processes kept {_fmt(load)} cores busy meanwhile\n"
    )
    print("| op | self CPU ms/step | share of self CPU | calls/step |")
    print("|---|---:|---:|---:|")
    for e in sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:row_limit]:
        share = e.self_cpu_time_total / total_self if total_self else 0.0
        print(f"| {e.key} | {e.self_cpu_time_total / 1e3 / steps:.2f} | {share:.1%} | {e.count / steps:.0f} |")
    print()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=row_limit))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        default="1M,16M,64M",
        help="comma list of parameter counts (K/M/G suffixes: one transformer block) or NxM (N vectors of M)",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per (optimizer, size), per round")
    parser.add_argument(
        "--rounds", type=int, default=1, help="> 1: time the optimizers of a size in turn, this many rounds"
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps first (at least MicroAdam's window, torchao's 3)"
    )
    parser.add_argument("--optimizers", default="", help="comma list filter: " + ",".join(s.name for s in OPTIMIZERS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSONL file to append results to")
    parser.add_argument(
        "--profile-microadam", action="store_true", help="profile MicroAdam's step (top ops) instead of benchmarking"
    )
    parser.add_argument(
        "--wait-idle", type=float, default=60.0, help="seconds to wait at most for other processes to go idle"
    )
    parser.add_argument(
        "--retries", type=int, default=2, help="re-time an optimizer while other processes used the CPU meanwhile"
    )
    parser.add_argument(
        "--busy-threshold", type=float, default=0.2, help="cores of other processes' use that count as contention"
    )
    parser.add_argument("--profile-size", default="16M", help="parameter count for --profile-microadam")
    parser.add_argument(
        "--grad-sets", type=int, default=4, help="sets of random gradients taken in turn, one per step (1: fixed)"
    )
    args = parser.parse_args(argv[1:])
    if min(args.steps, args.warmup, args.grad_sets, args.rounds) < 1 or args.retries < 0 or args.wait_idle < 0:
        parser.error("--steps, --warmup, --grad-sets and --rounds must be >= 1, --retries and --wait-idle >= 0")

    dynamo_config = getattr(getattr(torch, "_dynamo", None), "config", None)
    if dynamo_config is not None and hasattr(dynamo_config, "recompile_limit"):
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)

    noise = Noise(args.wait_idle, args.retries, args.busy_threshold)
    if args.profile_microadam:
        profile_microadam(args.profile_size, min(args.steps, 10), noise)
        return
    rows = run_benchmark(args, argv, noise)
    env = environment(argv)
    print(
        f"torch {env['torch']}, {env['packages']}, python {env['python']}, {env['cpu']}, "
        f"{env['cpu_count']} CPUs, torch threads {env['num_threads']}\n"
    )
    print(markdown_table(rows))
    print(f"\nwrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
