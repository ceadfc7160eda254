"""MicroAdam on a GPU: the Triton kernels checked against the torch path, then step time and memory.

One script for one call on a lent H200, under 5 minutes, ending with tables. Two phases:

1. **check**: a handful of configurations (sizes 1, 7, 4097, a 2-D weight and a transposed one;
   float32 and bfloat16 parameters; weight decay; stochastic error rounding; window 3 so that the
   ring wraps within the 8 steps; small blocks in two param groups; the paper's algorithm and the
   default variant, released error feedback) run the same random gradients
   through ``MicroAdam(impl="torch")`` and ``MicroAdam(impl="triton")`` on the device, and, for
   single-group configurations, through ``microadam_step(impl="triton")`` one tensor at a time.
   After every step the state (window indices and values, error codes and bounds, step counts)
   must be bit-identical to the torch path's, and the parameters within the tests' tolerance
   (``tests/common.py``: torch's CUDA ``scatter_add`` sums the moments in no fixed order, so they
   may differ by an ulp; bfloat16 under release within 4 ulps, as the kernels round it twice at
   the window's positions). After the first step ``microadam.state_bytes`` must be exactly equal
   on the device (both paths), on CPU (the torch path, on copies) and by the layout formula.
   A mismatch is printed, makes the exit status 1, and does not stop the timing. On a GPU the
   phase runs in a child process (``--isolate-checks``): a kernel that faults there cannot leave
   the timing phase a broken CUDA context, and a case the child did not report is a failed check.
2. **time**: parameter sets shaped like a LLaMA stack (per layer q, k, v, o ``[h, h]``, gate
   and up ``[ff, h]``, down ``[h, ff]``, two RMSNorm weights ``[h]``; plus the embedding and
   the lm head ``[vocab, h]`` and the final norm): about 125M, 350M and 1.3B parameters, in
   bf16 and fp32 (parameters and gradients). For each optimizer: fresh parameters and fixed
   random gradients, a warm-up (at least ``window`` steps for MicroAdam, so the ring is full and
   the kernels compiled; 3 for the others), then timed steps (at least ``--steps``, more while
   within ``--time-box`` seconds) with CUDA events around each ``opt.step()`` from an idle
   device: the median and the minimum; also the host's own time of those calls (``host ms``), and
   on a GPU the step's cost after 20 ms of other GPU work queued before it (``after queued work
   ms``, 5 steps, ``Clock.queued_ms``), as in a training loop that calls ``step()`` while the
   backward pass still runs: an optimizer that only queues kernels costs its kernels there, one
   that syncs first (MicroAdam's range check) its host work after the sync as well. One more
   step after ``reset_peak_memory_stats()`` gives the transient memory (peak allocated during the
   step minus allocated just before it).
   MicroAdam (triton) and fused AdamW run first, largest size first, then the slower torch path
   (seconds a step at 1.3B) and the peers, smallest first: if ``--budget-s`` (default 270 s)
   runs out, the targets are measured and the rest is cut short or marked skipped. Nothing starts
   after ``--hard-s`` (420 s), whatever compiling took; the check phase starts no case after
   ``--hard-s`` less ``--min-timing-s``. Every row (checks, measurements, the targets' verdicts)
   is appended to ``--out`` as soon as it is made, so a call cut short keeps what it measured.

Targets (the final table): at 1.3B, MicroAdam (triton)'s median step time <= fused AdamW's;
transient memory <= 1% of the parameters' bytes; ``state_bytes`` exactly the CPU formula
(``Layout.state_bytes``, which phase 1 checks against a CPU run).

Usage, from the repository root (``pip install -e . --no-deps`` or ``PYTHONPATH=src``)::

    PYTHONPATH=src python3 benchmarks/gpu.py --out $OUT/gpu.jsonl        # the H200 run: 5-7 min (device timeout_s 540)
    python benchmarks/gpu.py --device cpu --sizes tiny                    # CPU: Triton's interpreter
    python benchmarks/gpu.py --check-only
    python benchmarks/gpu.py --skip-check --sizes 1.3B --dtypes bf16 --optimizers microadam_triton,adamw_fused

``--device cpu`` sets ``TRITON_INTERPRET=1`` before microadam's kernels are imported (Triton
chooses between compiling and interpreting when a kernel is decorated), uses ``time.perf_counter``
and reports no memory; it is for proving the script end to end on a small stack (``tiny``: 2
layers, hidden 64), not for numbers.

bitsandbytes ``AdamW8bit`` and torchao ``AdamW4bit`` are timed when importable; the H200 image
has neither, so carry their wheels (see the device README): here, in the repository root
(``/.whl/`` is git-ignored)::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \\
        --platform manylinux2014_x86_64 -d .whl bitsandbytes==VERSION torchao==VERSION

(versions built for the device's torch), then run with ``carry=[".whl"]`` and the command prefixed by
``python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site
.whl/*.whl && export PYTHONPATH=/tmp/site:src || exit;``. torchao's optimizers compile with
torch.compile on their first steps: expect tens of seconds more per size and dtype.

Needs torch, triton (for ``impl="triton"``) and microadam only. Prints a Markdown table per phase
and appends one JSON line per check and per measurement (with versions and the device) to ``--out``
(default ``benchmarks/results/gpu.jsonl``). Exit status 1 if a check failed or a MicroAdam
measurement raised; a missed target does not change it (it is a measurement, not a test).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import faulthandler
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu.jsonl"
LR = 1e-4
FUSED = "adamw_fused"
TRITON = "microadam_triton"
TARGET_SIZE = "1.3B"
TRANSIENT_TARGET = 0.01  # of the parameters' bytes
PACKAGES = ("microadam", "triton", "numpy", "bitsandbytes", "torchao")
STATE_TENSORS = ("window_indices", "window_values", "error_codes", "error_bounds")

# tests/common.py's policy: the state matches bit for bit; a parameter may differ by an ulp of
# float32 per step (moments summed in another order), which a bf16 parameter shows, rarely, as
# one ulp of bf16.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-5),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# GPU work queued before each of the 'after queued work' steps (Clock.queued_ms), in ms.
QUEUED_BUSY_MS = 20.0
QUEUED_STEPS = 5


def _dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def _err(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


# ---------------------------------------------------------------------- parameter sets


@dataclass(frozen=True)
class Stack:
    """A LLaMA-like decoder's parameter shapes."""

    name: str
    hidden: int
    layers: int
    ff: int
    vocab: int = 32000

    def shapes(self) -> list[tuple[int, ...]]:
        h, f = self.hidden, self.ff
        layer = [(h, h)] * 4 + [(f, h), (f, h), (h, f), (h,), (h,)]
        return [(self.vocab, h), *(layer * self.layers), (h,), (self.vocab, h)]

    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes())


SIZES = {
    "tiny": Stack("tiny", hidden=64, layers=2, ff=176, vocab=512),
    "125M": Stack("125M", hidden=768, layers=12, ff=2048),
    "350M": Stack("350M", hidden=1024, layers=24, ff=2816),
    "1.3B": Stack("1.3B", hidden=2048, layers=24, ff=5504),
}


def make_params(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> list[torch.nn.Parameter]:
    """Fresh parameters with fixed random gradients, drawn on the device (1.3B on the CPU takes minutes)."""
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(0.02))
        p.grad = torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(1e-3)
        params.append(p)
    return params


# ---------------------------------------------------------------------- environment


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    if out["microadam"] is None:  # run from src/ without installing: the package says its version
        import microadam

        out["microadam"] = f"{microadam.__version__} (src)"
    return out


def environment(device: torch.device, argv: list[str]) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *argv]),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
    else:
        env.update(gpu=None, cpu_count=os.cpu_count(), num_threads=torch.get_num_threads())
    return env


def free_memory(device: torch.device) -> None:
    gc.collect()
    dynamo = getattr(torch, "_dynamo", None)
    if dynamo is not None and "torchao" in sys.modules:
        # torchao compiles per shape: drop the graphs so the next size does not hit the recompile limit.
        dynamo.reset()
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        except RuntimeError:  # a dead CUDA context: the rows say why, the summary still prints
            pass


# ---------------------------------------------------------------------- phase 1: check


@dataclass(frozen=True)
class CheckCase:
    name: str
    # One (parameter dtype, MicroAdam keyword arguments) per param group.
    groups: tuple[tuple[torch.dtype, dict[str, Any]], ...]
    steps: int = 8
    variant: str = "paper"
    # Under release the kernels round a low-precision parameter twice at the window's positions
    # (the torch path once), so trajectories would drift apart by a random walk of ulps. Such a case
    # compares one step at a time instead: every runner starts each step from the torch path's
    # parameters, and may differ from its result by the two roundings' error (_param_diff).
    one_step: bool = False


# (shape, transposed): one element, tiny, just over a 4096-block (a last block shorter than k),
# a 2-D weight of two blocks, and a non-contiguous one (the kernels copy it and write it back).
CHECK_SHAPES: tuple[tuple[tuple[int, ...], bool], ...] = (
    ((1,), False),
    ((7,), False),
    ((4097,), False),
    ((33, 130), False),
    ((65, 67), True),
)
CHECK_BASE = dict(lr=1e-2, window=3)
SMALL_BLOCKS = dict(block_size=64, density=0.05, quant_block_size=16)
CHECK_CASES = (
    CheckCase("fp32", ((torch.float32, {}),)),
    CheckCase("fp32-wd-stochastic-error", ((torch.float32, dict(weight_decay=0.1, error_rounding="stochastic")),)),
    CheckCase("bf16", ((torch.bfloat16, {}),)),
    CheckCase("bf16-wd-stochastic-error", ((torch.bfloat16, dict(weight_decay=0.1, error_rounding="stochastic")),)),
    CheckCase("bf16-wd-nearest-param", ((torch.bfloat16, dict(weight_decay=0.1, stochastic_rounding=False)),)),
    # Other tile modes of the compress kernel, and one launch serving two groups' tensors.
    CheckCase(
        "small-blocks-two-groups",
        ((torch.float32, SMALL_BLOCKS), (torch.bfloat16, dict(SMALL_BLOCKS, weight_decay=0.05))),
    ),
    # The default variant: released error feedback.
    CheckCase("fp32-release", ((torch.float32, {}),), variant="release"),
    CheckCase(
        "fp32-release-wd-stochastic-error",
        ((torch.float32, dict(weight_decay=0.1, error_rounding="stochastic")),),
        variant="release",
    ),
    CheckCase("bf16-release-wd", ((torch.bfloat16, dict(weight_decay=0.1)),), variant="release", one_step=True),
    CheckCase(
        "small-blocks-two-groups-release",
        ((torch.float32, SMALL_BLOCKS), (torch.bfloat16, dict(SMALL_BLOCKS, weight_decay=0.05))),
        variant="release",
        one_step=True,
    ),
    # Quantization blocks of several Top-K blocks (powers of two): released over tile rows.
    CheckCase(
        "fp32-release-quant-larger",
        ((torch.float32, dict(block_size=32, density=0.1, quant_block_size=128, weight_decay=0.1)),),
        variant="release",
    ),
)


@dataclass
class Runner:
    """One implementation's copy of the parameters, stepped by an optimizer or tensor by tensor."""

    name: str
    params: list[torch.nn.Parameter]
    opt: Any  # MicroAdam; for the single-tensor runner it only holds the groups' hyperparameters
    single: bool = False
    states: list[dict[str, torch.Tensor]] = field(default_factory=list)
    t: int = 0

    def step(self, grads: list[torch.Tensor]) -> None:
        for p, g in zip(self.params, grads):
            p.grad = g.to(p.device).clone()
        if not self.single:
            self.opt.step()
            return
        from microadam.functional import microadam_step

        self.t += 1
        group = self.opt.param_groups[0]
        for i, p in enumerate(self.params):
            microadam_step(
                p.detach(),
                p.grad,
                **self.states[i],
                layout=self.opt.layout(p, group),
                step=self.t,
                lr=group["lr"],
                beta1=group["betas"][0],
                beta2=group["betas"][1],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                error_rounding=group["error_rounding"],
                stochastic_param_rounding=group["stochastic_rounding"],
                seed=group["seed"],
                param_index=i,
                impl="triton",
                release=group["release"],
                release_scale=group["release_scale"],
            )

    def state(self, i: int) -> dict[str, Any]:
        if self.single:
            return {**self.states[i], "step": self.t}
        return self.opt.state[self.params[i]]


def _make_runner(name: str, case: CheckCase, init: list[list[torch.Tensor]], device: torch.device, impl: str) -> Runner:
    from microadam import MicroAdam

    groups, flat = [], []
    for (_, kwargs), tensors in zip(case.groups, init):
        ps = []
        for x in tensors:
            # A transposed initial value stays transposed: .to() keeps the strides of a dense tensor.
            ps.append(torch.nn.Parameter(x.to(device=device, copy=True)))
        groups.append(dict(params=ps, **kwargs))
        flat += ps
    from microadam.functional import zero_state

    single = impl == "triton-single"
    opt = MicroAdam(groups, impl="torch" if single else impl, variant=case.variant, **CHECK_BASE)
    runner = Runner(name, flat, opt, single=single)
    if single:
        group = opt.param_groups[0]
        for p in flat:
            lay = opt.layout(p, group)
            # The zero state MicroAdam allocates on a parameter's first step.
            runner.states.append(zero_state(lay, device))
    return runner


def _state_diff(ref: dict[str, Any], got: dict[str, Any]) -> str | None:
    """None if the four state tensors and the step count are bit-identical, else what differs."""
    if ref["step"] != got["step"]:
        return f"step count {got['step']} != {ref['step']}"
    for key in STATE_TENSORS:
        a, b = ref[key].cpu(), got[key].cpu()
        if a.dtype == torch.bfloat16:  # compare bits: -0.0 and 0.0 are different states
            a, b = a.view(torch.int16), b.view(torch.int16)
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{key}: {b.dtype} {tuple(b.shape)} != {a.dtype} {tuple(a.shape)}"
        if not torch.equal(a, b):
            bad = (a != b).reshape(-1)
            first = bad.nonzero()[:3].flatten().tolist()
            return f"{key} differs at {int(bad.sum())} of {a.numel()} entries, first at {first}"
    return None


def _param_diff(
    ref: torch.Tensor, got: torch.Tensor, prev: torch.Tensor | None = None, move: float = 0.0
) -> tuple[bool, float, int]:
    """(within tolerance, max |difference|, elements whose bits differ).

    With ``prev`` (the parameter both started the step from, for a low-precision parameter under
    release): each rounding may be off by an ulp of its value, the first of the intermediate
    ``p * decay - lr * move`` (at most ``|prev| + move``), the second of the result.
    """
    tol = TOLERANCES[ref.dtype]
    a, b = ref.detach().cpu().double(), got.detach().cpu().double()
    diff = (a - b).abs()
    if prev is not None and ref.dtype in (torch.bfloat16, torch.float16):
        bound = 2 * torch.finfo(ref.dtype).eps * (prev.detach().cpu().double().abs() + move + a.abs()) + tol["atol"]
    else:
        bound = tol["atol"] + tol["rtol"] * a.abs()
    ok = bool((diff <= bound).all()) and bool(torch.isfinite(b).all())
    bits = int((ref.detach().cpu().reshape(-1) != got.detach().cpu().reshape(-1)).sum())
    return ok, float(diff.max()) if diff.numel() else 0.0, bits


def run_check_case(case: CheckCase, device: torch.device) -> dict[str, Any]:
    """Step every implementation through ``case``; the row lists every mismatch found."""
    from microadam import state_bytes

    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    init: list[list[torch.Tensor]] = []
    for dtype, _ in case.groups:
        tensors = []
        for shape, transposed in CHECK_SHAPES:
            if transposed:
                tensors.append(torch.randn(shape[::-1], generator=gen, dtype=torch.float64).to(dtype).t())
            else:
                tensors.append(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))
        init.append(tensors)
    row: dict[str, Any] = {"phase": "check", "case": case.name, "steps": 0, "failures": [], "notes": []}
    failures: list[str] = row["failures"]
    ref = _make_runner("torch", case, init, device, "torch")
    # The same path again from the same start: a deterministic step gives the same bits (on CUDA the
    # window's repeated positions are summed by index_put_(accumulate=True), not by atomics).
    again = _make_runner("torch-again", case, init, device, "torch")
    cpu = _make_runner("cpu-torch", case, init, torch.device("cpu"), "torch")
    fast = [_make_runner("triton", case, init, device, "triton")]
    if len(case.groups) == 1:
        fast.append(_make_runner("triton-single", case, init, device, "triton-single"))
    dead: set[str] = set()  # runners that failed: not stepped or compared again
    raised: set[str] = set()
    max_diff = {r.name: 0.0 for r in fast}
    bits_differ = {r.name: 0 for r in fast}
    # The largest dense move of an element under release: lr * release_scale * sqrt(quant_block).
    move = max(g["lr"] * g["release_scale"] * math.sqrt(g["quant_block_size"]) for g in ref.opt.param_groups)
    for step in range(1, case.steps + 1):
        grads = [torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype) for xs in init for x in xs]
        prev = [p.detach().clone() for p in ref.params] if case.one_step else None
        ref.step(grads)
        cpu.step(grads)
        if "torch-again" not in dead:
            again.step(grads)
            for i, (p_ref, p) in enumerate(zip(ref.params, again.params)):
                differ = _param_diff(p_ref, p)[2]
                if differ:
                    failures.append(f"torch path run twice, step {step} param {i}: {differ} elements differ")
                    dead.add("torch-again")
                    break
        for r in fast:
            if r.name in dead:
                continue
            if prev is not None:
                with torch.no_grad():
                    for p, x in zip(r.params, prev):
                        p.copy_(x)
            try:
                r.step(grads)
            except Exception as e:  # a kernel that fails to compile or launch is a failed check
                failures.append(f"{r.name} step {step} raised {_err(e)}")
                dead.add(r.name)
                raised.add(r.name)
                continue
            for i, (p_ref, p) in enumerate(zip(ref.params, r.params)):
                where = f"{r.name} step {step} param {i} {tuple(p.shape)}"
                why = _state_diff(ref.state(i), r.state(i))
                if why is not None:
                    failures.append(f"{where}: {why}")
                    dead.add(r.name)
                    break
                ok, diff, bits = _param_diff(p_ref, p, prev[i] if prev is not None else None, move)
                max_diff[r.name] = max(max_diff[r.name], diff)
                bits_differ[r.name] = max(bits_differ[r.name], bits)
                if not ok:
                    failures.append(f"{where}: parameter off by {diff:.3g}, beyond the tolerance")
                    dead.add(r.name)
                    break
        # Informational: the torch path on the device against the same path on CPU (same state expected).
        for i in range(len(ref.params)):
            why = _state_diff(cpu.state(i), ref.state(i))
            if why is not None and not any(n.startswith("cpu") for n in row["notes"]):
                row["notes"].append(f"cpu torch vs {device.type} torch, step {step} param {i}: {why}")
        if step == 1:
            sizes = {"cpu_torch": state_bytes(cpu.opt), "torch": state_bytes(ref.opt)}
            if "triton" not in raised:
                sizes["triton"] = state_bytes(fast[0].opt)
            formula = sum(cpu.opt.layout(p, g).state_bytes for g in cpu.opt.param_groups for p in g["params"])
            sizes["formula"] = formula
            row["state_bytes"] = sizes
            if len(set(sizes.values())) != 1:
                failures.append(f"state_bytes differ after step 1: {sizes}")
        row["steps"] = step
    row["max_param_diff"] = max_diff
    row["param_bits_differ"] = bits_differ
    row["ok"] = not failures
    row["seconds"] = time.perf_counter() - t0
    return row


def check_grads_in_range(device: torch.device) -> dict[str, Any]:
    """``optimizer.grads_in_range`` on the device (one multi-tensor norm per dtype there): 300
    gradients of three dtypes, every 20th one empty and every 50th non-contiguous, are in range; one
    NaN, Inf, -Inf or finite value beyond GRAD_LIMIT anywhere (the first, after an empty one,
    non-contiguous, the very last) makes them not; values within the limit whose norm is not (the
    limit three times, or twice with opposite signs) are confirmed in range."""
    from microadam.optimizer import GRAD_LIMIT, grads_in_range

    gen = torch.Generator(device=device).manual_seed(1)
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    grads = []
    for i in range(300):
        n = 0 if i % 20 == 0 else 1 + 997 * i
        g = torch.randn(n, 2, generator=gen, device=device)[:, 0] if i % 50 == 7 else torch.randn(n, device=device)
        grads.append(g.to(dtypes[i % 3]) if i % 50 != 7 else g)
    failures = []
    if not grads_in_range(grads):
        failures.append("gradients in range were found out of range")
    bads = [(1, 0, "nan"), (21, -1, "inf"), (57, 5000, "-inf"), (157, -1, "nan"), (299, -1, "inf")]
    bads += [(4, 3, -2 * GRAD_LIMIT), (57, -1, 3e38), (107, 0, 2 * GRAD_LIMIT)]  # float32 and bfloat16 ones
    for i, pos, bad in bads:
        g = grads[i]
        kept = g[pos].clone()
        g[pos] = float(bad)  # in place: non-contiguous ones stay so
        if grads_in_range(grads):
            failures.append(f"{bad} at element {pos} of gradient {i} ({g.dtype}) was missed")
        g[pos] = kept
    for within in ([GRAD_LIMIT] * 3, [GRAD_LIMIT, -GRAD_LIMIT]):
        if not grads_in_range([*grads, torch.tensor(within, device=device)]):
            failures.append(f"{within} (within the limit, its norm beyond it) was found out of range")
    return {"phase": "check", "case": "range check", "ok": not failures, "failures": failures, "notes": []}


def run_checks(
    device: torch.device,
    log: Callable[[str], None],
    write: Callable[[dict[str, Any]], None] | None = None,
    deadline: float = math.inf,
) -> list[dict[str, Any]]:
    """Phase 1. Each row is written as soon as it is made (a run killed later keeps it); the cases not
    started by ``deadline`` are skipped (``ok`` None), so that the timing phase keeps its time."""
    rows = []

    def done(row: dict[str, Any]) -> None:
        rows.append(row)
        if write is not None:
            write(row)
        state = "skipped" if row["ok"] is None else "ok" if row["ok"] else "FAILED: " + row["failures"][0]
        log(f"[check] {row['case']}: {state}")

    try:
        row = check_grads_in_range(device)
    except Exception as e:
        row = {"phase": "check", "case": "range check", "ok": False, "failures": [f"raised {_err(e)}"]}
        log(traceback.format_exc())
    done(row)
    for case in CHECK_CASES:
        if time.perf_counter() > deadline:
            done({"phase": "check", "case": case.name, "ok": None, "failures": [], "notes": []})
            continue
        try:
            row = run_check_case(case, device)
        except Exception as e:  # the torch path or the setup broke: a failed check, not a crash
            row = {"phase": "check", "case": case.name, "ok": False, "failures": [f"raised {_err(e)}"], "notes": []}
            log(traceback.format_exc())
        done(row)
        free_memory(device)
    return rows


def run_checks_isolated(
    args: argparse.Namespace,
    log: Callable[[str], None],
    write: Callable[[dict[str, Any]], None],
    deadline: float,
) -> list[dict[str, Any]]:
    """Phase 1 in a child process (``--check-only``), whose rows are read back from ``--out``.

    A kernel that faults on the GPU (an illegal address) leaves its CUDA context unusable: in one
    process every later measurement would fail too, and the one lent call would bring back no
    timing. The child's context dies with it, and the timing phase runs in this process's. Triton's
    on-disk cache keeps what the child compiled. A case the child did not report (it crashed, or
    hung past ``deadline`` plus a grace) is a failed check naming the child's end.
    """
    names = ["range check", *(case.name for case in CHECK_CASES)]
    offset = args.out.stat().st_size if args.out.exists() else 0
    left = deadline - time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--check-only", "--device", args.device]
    cmd += ["--out", str(args.out), "--hard-s", f"{max(left, 0.0):.1f}", "--isolate-checks", "no"]
    env = dict(os.environ)
    # The child checks the microadam this process times (an installed one, or the checkout's src/).
    spec = importlib.util.find_spec("microadam")
    where = str(Path(spec.origin).resolve().parent.parent) if spec and spec.origin else str(REPO / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (where, env.get("PYTHONPATH", "")) if p)
    log(f"[check] in a child process: {shlex.join(cmd)}")
    # The child starts no case after the deadline; the grace covers the last one started (its kernels
    # compiling). At most half of --min-timing-s: a hung child must leave the timing phase time.
    grace = min(60.0, args.min_timing_s / 2)
    # Its output goes to stderr with the log: the tables are printed once, by this process. Its own
    # session: a kill on a hang takes the compilers it started too.
    proc = subprocess.Popen(cmd, env=env, stdout=sys.stderr, start_new_session=True)
    try:
        code = proc.wait(timeout=max(left, 0.0) + grace)
        ended = f"the check process ended with exit status {code}"
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = None
        ended = f"the check process was killed after {max(left, 0.0) + grace:.0f} s (a hang?)"
    rows: dict[str, dict[str, Any]] = {}
    if args.out.exists():
        with args.out.open("rb+") as f:
            f.seek(offset)
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.write(b"\n")  # a line cut short by a crash or the kill: this process's rows start anew
        for line in data.decode(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the cut line
                continue
            if row.get("phase") == "check" and row.get("case") in names:
                rows[row["case"]] = row
    out = []
    missing = [name for name in names if name not in rows]
    for name in names:
        if name not in rows:
            rows[name] = {"phase": "check", "case": name, "ok": False, "notes": []}
            rows[name]["failures"] = [f"not reported: {ended} before this case (its log is above)"]
            write(rows[name])
            log(f"[check] {name}: FAILED: {rows[name]['failures'][0]}")
        out.append(rows[name])
    expected = 0 if all(r["ok"] for r in out) else 1  # the child's own exit rule
    if code is not None and code != expected and not missing:
        # Every case reported, but the child did not end as its rows say (a fault at teardown).
        row = {"phase": "check", "case": "check process", "ok": False, "notes": []}
        row["failures"] = [f"{ended}, where its rows give {expected} (its log is above)"]
        write(row)
        log(f"[check] check process: FAILED: {row['failures'][0]}")
        out.append(row)
    return out


# ---------------------------------------------------------------------- phase 2: time


class NotInstalledError(RuntimeError):
    """An optional peer optimizer's package is missing."""


class OverBudgetError(RuntimeError):
    """The run's time budget (--budget-s) ran out."""


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    build: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
    min_warmup: int
    priority: int  # lower runs first: the target's two rows before the slow torch path and the peers
    micro: bool = False


def _microadam(impl: str, variant: str = "release") -> Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]:
    def build(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        from microadam import MicroAdam

        return MicroAdam(params, lr=LR, impl=impl, variant=variant)

    return build


def _bnb_adamw8bit(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise NotInstalledError("not installed: carry its wheel (see the docstring)") from e
    return bnb.optim.AdamW8bit(params, lr=LR)


def _torchao_adamw4bit(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    try:
        import torchao.optim
    except ImportError as e:
        raise NotInstalledError("not installed: carry its wheel (see the docstring)") from e
    return torchao.optim.AdamW4bit(params, lr=LR)


OPTIMIZERS = (
    # Window 10 at the defaults: 10 warm-up steps fill the ring, so timed steps read every slot.
    OptimizerSpec(TRITON, _microadam("triton"), min_warmup=10, priority=0, micro=True),
    OptimizerSpec(FUSED, lambda ps: torch.optim.AdamW(ps, lr=LR, fused=True), min_warmup=3, priority=0),
    # The paper's algorithm (no release: the update touches only the window's positions).
    OptimizerSpec("microadam_triton_paper", _microadam("triton", "paper"), min_warmup=10, priority=1, micro=True),
    # The torch path of the default variant: what impl=None runs on CUDA.
    OptimizerSpec("microadam_torch", _microadam("torch"), min_warmup=10, priority=1, micro=True),
    OptimizerSpec("bnb_adamw8bit", _bnb_adamw8bit, min_warmup=3, priority=2),
    # torch.compile'd: its first steps compile.
    OptimizerSpec("torchao_adamw4bit", _torchao_adamw4bit, min_warmup=3, priority=2),
)


class Clock:
    """Step times from an idle device: CUDA events on a GPU (the step's span on the stream,
    host-side work inside the step included), ``perf_counter`` on CPU; and the host's own time of
    the ``opt.step()`` call."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.host_ms: list[float] = []
        if device.type == "cuda":
            self.start = torch.cuda.Event(enable_timing=True)
            self.mid = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
        self._sleep_cycles: int | None = None

    def step_ms(self, opt: torch.optim.Optimizer) -> float:
        if self.device.type != "cuda":
            t0 = time.perf_counter()
            opt.step()
            ms = (time.perf_counter() - t0) * 1e3
            self.host_ms.append(ms)
            return ms
        torch.cuda.synchronize(self.device)
        self.start.record()
        t0 = time.perf_counter()
        opt.step()
        self.host_ms.append((time.perf_counter() - t0) * 1e3)
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end)

    def queued_ms(self, opt: torch.optim.Optimizer, busy_ms: float = QUEUED_BUSY_MS) -> float | None:
        """The step's span on the GPU after ``busy_ms`` of other work queued before it (as a training
        loop calls ``step()`` while the backward pass still runs): from the end of that work to the
        step's end. An optimizer that only queues kernels costs its kernels here; one that syncs
        first costs its host work after the sync as well. None on CPU."""
        if self.device.type != "cuda":
            return None
        if self._sleep_cycles is None:  # calibrate torch.cuda._sleep (spins for clock cycles)
            torch.cuda.synchronize(self.device)
            self.start.record()
            torch.cuda._sleep(10_000_000)
            self.end.record()
            self.end.synchronize()
            self._sleep_cycles = max(1, int(10_000_000 * busy_ms / max(self.start.elapsed_time(self.end), 1e-3)))
        torch.cuda.synchronize(self.device)
        self.start.record()
        torch.cuda._sleep(self._sleep_cycles)
        self.mid.record()
        opt.step()
        self.end.record()
        self.end.synchronize()
        return self.mid.elapsed_time(self.end)


def _transient_step(opt: torch.optim.Optimizer, device: torch.device) -> tuple[int | None, int | None, int | None]:
    """(peak extra bytes during one step, bytes the step left allocated, peak bytes) on a GPU; Nones on CPU."""
    if device.type != "cuda":
        opt.step()
        return None, None, None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    opt.step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak - before, torch.cuda.memory_allocated(device) - before, peak


def measure(
    spec: OptimizerSpec,
    stack: Stack,
    dtype: torch.dtype,
    device: torch.device,
    args: argparse.Namespace,
    deadline: float,
) -> dict[str, Any]:
    """Warm up, time and measure one optimizer on fresh parameters; the row holds the numbers or the error."""
    from microadam import state_bytes

    shapes = stack.shapes()
    numel = stack.numel()
    param_bytes = numel * torch.tensor([], dtype=dtype).element_size()
    row: dict[str, Any] = {
        "phase": "time",
        "optimizer": spec.name,
        "size": stack.name,
        "dtype": _dtype_name(dtype),
        "numel": numel,
        "param_bytes": param_bytes,
        "error": None,
    }
    if time.perf_counter() > deadline:
        row["error"] = "skipped: the time budget ran out (--budget-s, --hard-s)"
        return row
    params: list[torch.nn.Parameter] = []
    opt = None
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        params = make_params(shapes, dtype, device)
        opt = spec.build(params)
        clock = Clock(device)
        warmup = max(args.warmup, spec.min_warmup)
        t0 = time.perf_counter()
        clock.step_ms(opt)  # state allocation and, for the kernels, compilation
        row["first_step_s"] = time.perf_counter() - t0
        for _ in range(warmup - 1):
            if time.perf_counter() > deadline:
                raise OverBudgetError("skipped during warm-up: the time budget ran out (--budget-s, --hard-s)")
            clock.step_ms(opt)
        times: list[float] = []
        box_end = time.perf_counter() + args.time_box
        while len(times) < args.max_steps and (len(times) < args.steps or time.perf_counter() < box_end):
            if times and time.perf_counter() > deadline:
                break
            times.append(clock.step_ms(opt))
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        queued: list[float] = []
        try:
            for _ in range(QUEUED_STEPS if device.type == "cuda" else 0):
                queued.append(clock.queued_ms(opt))  # type: ignore[arg-type]
        except Exception as e:  # an extra number: its failure must not cost the row
            row["queued_error"] = _err(e)
        row["queued_median_ms"] = statistics.median(queued) if queued else None
        row["host_median_ms"] = statistics.median(clock.host_ms[-len(times) :])
        transient, retained, step_peak = _transient_step(opt, device)
        sbytes = state_bytes(opt)
        row.update(
            median_ms=statistics.median(times),
            min_ms=min(times),
            mean_ms=statistics.fmean(times),
            timed_steps=len(times),
            warmup_steps=warmup,
            transient_bytes=transient,
            transient_pct=None if transient is None else 100 * transient / param_bytes,
            retained_bytes=retained,
            peak_bytes=None if peak is None else max(peak, step_peak or 0),
            state_bytes=sbytes,
            bytes_per_param=sbytes / numel,
            params_finite=all(bool(torch.isfinite(p).all()) for p in params),
        )
        if spec.micro:
            group = opt.param_groups[0]
            row["expected_state_bytes"] = sum(opt.layout(p, group).state_bytes for p in params)
    except (NotInstalledError, OverBudgetError) as e:
        row["error"] = str(e)
    except Exception as e:  # recorded in the row: one optimizer failing must not cost the others' numbers
        row["error"] = f"failed: {_err(e)}"
        row["traceback"] = traceback.format_exc()[-4000:]
    del opt, params
    free_memory(device)
    return row


def run_timing(
    device: torch.device, args: argparse.Namespace, deadline: float, log: Callable[[str], None], write: Callable
) -> list[dict[str, Any]]:
    wanted = [s.strip() for s in args.optimizers.split(",") if s.strip()]
    specs = [s for s in OPTIMIZERS if s.name in wanted]
    stacks = [SIZES[s] for s in args.sizes]
    dtypes = [DTYPES[d] for d in args.dtypes]
    jobs = [(spec, stack, dtype) for stack in stacks for dtype in dtypes for spec in specs]

    # The target's rows first, largest size first, so that a run cut short by the budget still has them;
    # then the slower context rows (the torch path at 1.3B takes seconds a step) smallest first, so
    # that as many as possible fit.
    def rank(j: int) -> tuple[int, int, int, int]:
        spec, stack, dtype = jobs[j]
        return spec.priority, -stack.numel() if spec.priority == 0 else stack.numel(), dtypes.index(dtype), j

    order = sorted(range(len(jobs)), key=rank)
    rows: list[dict[str, Any] | None] = [None] * len(jobs)
    for j in order:
        spec, stack, dtype = jobs[j]
        row = measure(spec, stack, dtype, device, args, deadline)
        if row.get("traceback"):
            log(row["traceback"])
        status = row["error"] or f"median {row['median_ms']:.3f} ms over {row['timed_steps']} steps"
        log(f"[time] {stack.name} {_dtype_name(dtype)} {spec.name}: {status}")
        rows[j] = row
        write(row)
    done = [r for r in rows if r is not None]
    for r in done:
        fused = next(
            (
                x
                for x in done
                if x["optimizer"] == FUSED and x["size"] == r["size"] and x["dtype"] == r["dtype"] and not x["error"]
            ),
            None,
        )
        ok = fused is not None and r.get("median_ms") is not None
        r["ratio_vs_fused_adamw"] = r["median_ms"] / fused["median_ms"] if ok else None
    return done


# ---------------------------------------------------------------------- tables


def _f(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _int(value: int | None) -> str:
    return "" if value is None else f"{value:,}"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def _check_result(ok: bool | None) -> str:
    return "skipped (time)" if ok is None else "PASS" if ok else "FAIL"


def check_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| check | steps | result | max param diff (triton / single) "
        "| state bytes (cpu torch = torch = triton = formula) | first failure |",
        "|---|---:|---|---|---|---|",
    ]
    for r in rows:
        diffs = r.get("max_param_diff") or {}
        diff = " / ".join(f"{v:.2g}" for v in diffs.values())
        sizes = r.get("state_bytes") or {}
        if not sizes:  # a check of something else than a step (the range check)
            sb = ""
        elif len(set(sizes.values())) == 1:
            sb = " = ".join(f"{v:,}" for v in sizes.values())
        else:
            sb = str(sizes)
        first = r["failures"][0].replace("|", "/") if r["failures"] else ""
        lines.append(f"| {r['case']} | {r.get('steps', '')} | {_check_result(r['ok'])} | {diff} | {sb} | {first} |")
    return "\n".join(lines)


def results_table(rows: list[dict[str, Any]], sizes: list[str], dtypes: list[str]) -> str:
    names = [s.name for s in OPTIMIZERS]
    rows = sorted(rows, key=lambda r: (sizes.index(r["size"]), dtypes.index(r["dtype"]), names.index(r["optimizer"])))
    lines = [
        "| size | params | dtype | optimizer | median ms | min ms | x fused AdamW | host ms | after queued work ms "
        "| timed steps | first step s | transient MiB | transient % params | peak MiB | state MiB | bytes/param |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        head = f"| {r['size']} | {r['numel'] / 1e6:.1f}M | {r['dtype']} | {r['optimizer']} "
        if r["error"]:
            lines.append(head + f"| {r['error'].replace('|', '/')} | | | | | | | | | | | |")
            continue
        queued = _f(r.get("queued_median_ms"), 3) if r.get("queued_median_ms") is not None else "n/a"
        lines.append(
            head + f"| {_f(r['median_ms'], 3)} | {_f(r['min_ms'], 3)} | {_f(r['ratio_vs_fused_adamw'])} "
            f"| {_f(r.get('host_median_ms'), 3)} | {queued} "
            f"| {r['timed_steps']} | {_f(r['first_step_s'], 1)} | {_mib(r['transient_bytes'])} "
            f"| {_f(r['transient_pct'], 3) if r['transient_pct'] is not None else 'n/a'} | {_mib(r['peak_bytes'])} "
            f"| {_mib(r['state_bytes'])} | {r['bytes_per_param']:.3f} |"
        )
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One verdict row per MicroAdam (size, dtype, impl) measured."""
    out = []
    for r in rows:
        if not r["optimizer"].startswith("microadam"):
            continue
        if r["error"]:  # a missing measurement is a verdict too: it shows in the last table
            why = "not measured" if r["error"].startswith("skipped") else "FAIL (raised)"
            out.append(
                dict(
                    optimizer=r["optimizer"],
                    size=r["size"],
                    dtype=r["dtype"],
                    ms=None,
                    fused_ms=None,
                    time=why,
                    transient_pct=None,
                    transient=why,
                    state_bytes=None,
                    expected_state_bytes=None,
                    state=why,
                )
            )
            continue
        fused = next(
            (x for x in rows if x["optimizer"] == FUSED and x["size"] == r["size"] and x["dtype"] == r["dtype"]), None
        )
        t: dict[str, Any] = {"optimizer": r["optimizer"], "size": r["size"], "dtype": r["dtype"]}
        t["ms"] = r["median_ms"]
        t["fused_ms"] = fused.get("median_ms") if fused else None
        if r["optimizer"] != TRITON or r["size"] != TARGET_SIZE:
            t["time"] = "n/a"  # the target is the kernels' at 1.3B
        elif t["fused_ms"] is None:
            t["time"] = "n/a (no fused AdamW row)"
        else:
            t["time"] = "PASS" if t["ms"] <= t["fused_ms"] else "FAIL"
        if r["transient_bytes"] is None:
            t["transient"] = "n/a (CPU)"
        else:
            ok = r["transient_bytes"] <= TRANSIENT_TARGET * r["param_bytes"]
            t["transient"] = ("PASS" if ok else "FAIL") if r["optimizer"] == TRITON else ("ok" if ok else "over (info)")
        t["transient_pct"] = r["transient_pct"]
        t["state_bytes"], t["expected_state_bytes"] = r["state_bytes"], r.get("expected_state_bytes")
        t["state"] = "PASS" if r["state_bytes"] == r.get("expected_state_bytes") else "FAIL"
        out.append(t)
    return out


def targets_table(verdicts: list[dict[str, Any]]) -> str:
    lines = [
        "| optimizer | size | dtype | median ms | fused AdamW ms | step <= fused AdamW (1.3B) | transient % params "
        "| transient <= 1% | state bytes | CPU formula | state == CPU |",
        "|---|---|---|---:|---:|---|---:|---|---:|---:|---|",
    ]
    for t in verdicts:
        lines.append(
            f"| {t['optimizer']} | {t['size']} | {t['dtype']} | {_f(t['ms'], 3)} | {_f(t['fused_ms'], 3)} "
            f"| {t['time']} "
            f"| {_f(t['transient_pct'], 3) if t['transient_pct'] is not None else 'n/a'} | {t['transient']} "
            f"| {_int(t['state_bytes'])} | {_int(t['expected_state_bytes'])} | {t['state']} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------- main


def _split(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", default="cuda", choices=("cuda", "cpu"), help="cpu: kernels in Triton's interpreter"
    )
    parser.add_argument("--sizes", default=None, help=f"comma list of {list(SIZES)} (default: all but tiny; cpu: tiny)")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16, fp32 (parameters and gradients)")
    parser.add_argument("--optimizers", default=",".join(s.name for s in OPTIMIZERS), help="comma list to time")
    parser.add_argument("--steps", type=int, default=5, help="timed steps at least, per measurement")
    parser.add_argument("--max-steps", type=int, default=100, help="timed steps at most, per measurement")
    parser.add_argument("--time-box", type=float, default=2.0, help="seconds of timed steps past --steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (MicroAdam: at least its window)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="seconds from the start after which measurements are cut short or skipped "
        "(default 270 on cuda, to end within 5 minutes; 1800 on cpu, where the interpreter is slow)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSONL file to append rows to")
    parser.add_argument(
        "--min-timing-s",
        type=float,
        default=120.0,
        help="seconds the timing phase gets at least, past --budget-s if the checks took longer (their kernel "
        "compilation counts there: an sm_90 compile of the default compress tile took 26 s on a busy 2-core host)",
    )
    parser.add_argument(
        "--hard-s",
        type=float,
        default=None,
        help="seconds from the start after which nothing new starts, whatever --min-timing-s asks (default 420 "
        "on cuda: a measurement started just before it may still compile kernels for about a minute, and the "
        "lent device's call ends at 540-600 s; none on cpu). The check phase starts no case after "
        "--hard-s less --min-timing-s",
    )
    parser.add_argument(
        "--isolate-checks",
        default="auto",
        choices=("auto", "yes", "no"),
        help="run the check phase in a child process, so that a kernel's GPU fault cannot spoil the timing "
        "phase's CUDA context (auto: yes on cuda when timing follows)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check-only", action="store_true", help="phase 1 only")
    mode.add_argument("--skip-check", action="store_true", help="phase 2 only")
    args = parser.parse_args(argv)
    args.sizes = _split(args.sizes or ("tiny" if args.device == "cpu" else "125M,350M,1.3B"))
    args.dtypes = _split(args.dtypes)
    if args.budget_s is None:
        args.budget_s = 1800.0 if args.device == "cpu" else 270.0
    if args.hard_s is None:
        args.hard_s = math.inf if args.device == "cpu" else 420.0
    if unknown := [s for s in args.sizes if s not in SIZES]:
        parser.error(f"unknown sizes {unknown}; choose from {list(SIZES)}")
    if unknown := [d for d in args.dtypes if d not in DTYPES]:
        parser.error(f"unknown dtypes {unknown}; choose from {list(DTYPES)}")
    if unknown := [o for o in _split(args.optimizers) if o not in {s.name for s in OPTIMIZERS}]:
        parser.error(f"unknown optimizers {unknown}; choose from {[s.name for s in OPTIMIZERS]}")
    if args.steps < 1 or args.max_steps < args.steps or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1 and --max-steps >= --steps")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("no CUDA device here; use --device cpu (with --sizes tiny) to run the script on CPU")
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            parser.error("TRITON_INTERPRET is set: unset it so that the kernels compile for the GPU")
    return args


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    argv = sys.argv if argv is None else argv
    args = parse_args(argv[1:])
    if args.device == "cpu":
        if "microadam.kernels.triton_kernels" in sys.modules:
            raise SystemExit("--device cpu: microadam's kernels were imported before TRITON_INTERPRET could be set")
        os.environ["TRITON_INTERPRET"] = "1"
    if importlib.util.find_spec("microadam") is None:
        # Run from a checkout without `pip install -e .`: the package is in src/.
        sys.path.insert(0, str(REPO / "src"))
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.init()
    env = environment(device, argv)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write(row: dict[str, Any]) -> None:
        with args.out.open("a") as f:
            f.write(json.dumps({**row, **env}, default=str) + "\n")

    log(f"{env.get('gpu') or 'CPU'}, torch {env['torch']}, {env['packages']}, python {env['python']}")
    # A hang (a kernel that never ends, a wait on a broken device) at least shows where it was.
    if math.isfinite(args.hard_s):
        faulthandler.dump_traceback_later(args.hard_s + 90, exit=False)
    check_rows: list[dict[str, Any]] = []
    if not args.skip_check:
        hard_checks = start + args.hard_s - (0 if args.check_only else args.min_timing_s)
        isolate = args.isolate_checks == "yes" or (
            args.isolate_checks == "auto" and device.type == "cuda" and not args.check_only
        )
        if isolate:
            # A cpu run has no limit of its own: the child gets the budget's.
            limit = hard_checks if math.isfinite(hard_checks) else start + args.budget_s
            check_rows = run_checks_isolated(args, log, write, deadline=limit)
        else:
            check_rows = run_checks(device, log, write, deadline=hard_checks)
    time_rows: list[dict[str, Any]] = []
    if not args.check_only:
        # The targets' rows come first in the timing phase: a check phase slowed by compiling must not
        # leave them skipped, but nothing starts after --hard-s (the device call's own timeout).
        deadline = min(max(start + args.budget_s, time.perf_counter() + args.min_timing_s), start + args.hard_s)
        time_rows = run_timing(device, args, deadline, log, write)

    failed_checks = [r for r in check_rows if r["ok"] is False]
    failed_micro = [
        r for r in time_rows if r["optimizer"].startswith("microadam") and (r["error"] or "").startswith("failed")
    ]
    print(
        f"\n{env.get('gpu') or 'CPU (Triton interpreter)'} | torch {env['torch']} | CUDA {env['cuda']} | "
        f"{', '.join(f'{k} {v}' for k, v in env['packages'].items())} | python {env['python']} | "
        f"{time.perf_counter() - start:.0f} s in all | rows appended to {args.out}"
    )
    for r in failed_checks:
        print(f"\nCHECK FAILED: {r['case']}")
        for line in r["failures"][:10]:
            print(f"  - {line}")
    for r in check_rows:
        for note in r.get("notes", []):
            print(f"note ({r['case']}): {note}")
    for r in failed_micro:
        print(f"\nMEASUREMENT FAILED: {r['size']} {r['dtype']} {r['optimizer']}: {r['error']}")
    skipped_checks = [r["case"] for r in check_rows if r["ok"] is None]
    if skipped_checks:
        print(f"\nCHECKS NOT RUN (time ran out, --hard-s): {', '.join(skipped_checks)}")
    if check_rows:
        print("\n## Check: MicroAdam impl='triton' against impl='torch' on " + str(device) + "\n")
        print(check_table(check_rows))
    if time_rows:
        counts = ", ".join(f"{s} = {SIZES[s].numel():,}" for s in args.sizes)
        print(f"\n## Step time and memory ({device}; parameters: {counts})\n")
        print(results_table(time_rows, args.sizes, args.dtypes))
        verdicts = targets(time_rows)
        if verdicts:
            print("\n## Targets\n")
            print(targets_table(verdicts))
            for v in verdicts:  # the verdicts in the JSONL too: the printed tables are lost with the call's log
                write({"phase": "target", **v})
    # A check not run is no pass: the exit status says the kernels were not all checked.
    return 1 if failed_checks or failed_micro or skipped_checks else 0


if __name__ == "__main__":
    sys.exit(main())
