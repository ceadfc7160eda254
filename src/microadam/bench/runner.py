"""Run a plan: each (stage, optimizer, seed) once, recorded as one JSONL row; resumable.

Stages escalate: a candidate that fails a stage's acceptance bar is not run in
later stages, and the baseline runs only while some candidate is still in. An
interrupted ``compare`` re-reads its records and runs only what is missing.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import numbers
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from microadam.bench.measure import (
    ProgressBar,
    current_rss,
    environment,
    median,
    peak_rss,
    release_free_memory,
    reset_peak_rss,
)
from microadam.bench.optimizers import NotInstalled, build_optimizer, get_spec
from microadam.bench.spec import OUTPUT_MARKER, Plan, PlanError, Stage
from microadam.bench.tasks import MissingDependency, TaskSize, get_task
from microadam.memory import state_bytes

__all__ = ["run_plan", "run_one", "read_records", "resolve_device"]

MAX_CURVE_POINTS = 200
WARMUP_STEPS = 2  # excluded from step-time medians (first-step allocation, torchao compilation)


def resolve_device(name: str) -> torch.device:
    """The plan's ``device`` on this machine; a PlanError if it is not here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PlanError(f"plan key 'device': {name!r} was asked for but CUDA is not available; use 'cpu' or 'auto'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise PlanError(
            f"plan key 'device': {name!r} was asked for but this machine has {torch.cuda.device_count()} "
            f"CUDA device(s); use 'cuda:0' to 'cuda:{torch.cuda.device_count() - 1}', 'cuda' or 'auto'"
        )
    return dev


def read_records(path: Path) -> list[dict[str, Any]]:
    """All rows of a records file; a torn last line (a killed writer) is ignored.

    ``PlanError`` (naming the file) for what is no records file: a folder, bytes that are not UTF-8,
    a line of JSON that is not an object.
    """
    if not path.exists():
        return []
    fix = "give compare a new --out, or move the file away"
    try:
        text = path.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise PlanError(f"{str(path)!r} is a folder, not compare's records file; {fix}") from None
    except UnicodeDecodeError as e:
        raise PlanError(f"{str(path)!r} is not a compare records file (not UTF-8 text: {e.reason}); {fix}") from None
    except OSError as e:
        raise PlanError(f"{str(path)!r} cannot be read ({e.strerror or e}); {fix}") from None
    rows = []
    for i, line in enumerate(text.splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict):
            raise PlanError(f"{str(path)!r} line {i + 1} is not a record (a JSON object): not compare's file; {fix}")
        rows.append(row)
    return rows


def _json_value(value: Any) -> Any:
    """A value JSON cannot write, as the closest it can: a task's ``evaluate`` or ``info`` may hold numpy
    scalars or tensors (a user's task, ``docs/compare.md``), which would otherwise stop the compare."""
    if hasattr(value, "tolist"):
        return value.tolist()  # numpy scalars and arrays, tensors
    return str(value)


def _append(path: Path, row: dict[str, Any]) -> None:
    # A writer killed mid-line leaves a fragment with no newline: the row must start on a line of
    # its own, or it is glued to the fragment and lost when the file is read back.
    torn = False
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, 2)
            torn = f.read(1) != b"\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(("\n" if torn else "") + json.dumps(row, default=_json_value) + "\n")
        f.flush()


def _metric(metrics: Any, task: Any) -> float:
    """The task's metric from what its ``evaluate`` returned, or a ValueError saying what came back."""
    if not isinstance(metrics, Mapping) or task.metric not in metrics:
        got = (
            f"a dict with keys {sorted(map(str, metrics))}" if isinstance(metrics, Mapping) else type(metrics).__name__
        )
        raise ValueError(
            f"{type(task).__name__}.build()'s evaluate returned {got}, without the task's metric {task.metric!r}: "
            f"return a dict holding it, or set the class's metric to one of its keys"
        )
    return _number(metrics[task.metric], task.metric, type(task).__name__)


def _number(value: Any, name: str, where: str) -> float:
    """A metric as a Python float: a number, or a one-element tensor or array. Anything else raises
    (the run is recorded as an error naming it): the verdict compares numbers, and a list or a string
    stored as a finished run's metric would stop every later compare of the folder."""
    if hasattr(value, "item") and not isinstance(value, numbers.Number):
        try:
            value = value.item()  # a one-element tensor or array, a NumPy scalar
        except (ValueError, RuntimeError, TypeError):
            pass  # more than one element: refused below
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"{where}.build()'s evaluate returned {name} = {value!r} ({type(value).__name__}); the metric must be one "
            "number (a float, or a one-element tensor): return e.g. float(accuracy)"
        )
    return float(value)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _thin(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    if len(points) <= MAX_CURVE_POINTS:
        return points
    stride = math.ceil(len(points) / MAX_CURVE_POINTS)
    return points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])


def make_schedule(opt: torch.optim.Optimizer, kind: str, steps: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The plan's ``lr_schedule`` over a stage of ``steps``: each lr decays from its value to 0 at the
    last step, linearly or along a half cosine (``"constant"``: None, the lr stays)."""
    if kind == "constant":
        return None
    if kind == "linear":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.0, 1.0 - i / steps))
    if kind == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1.0 + math.cos(math.pi * min(i, steps) / steps)))
    raise ValueError(f"Invalid lr_schedule: {kind!r}; use 'constant', 'linear' or 'cosine'")


def run_label(plan: Plan, optimizer: str) -> str:
    """How the report names ``optimizer``'s runs, a failed one's too: the library's optimizer with the
    arguments its label shows, and the variant's name where the plan names a variant."""
    base = plan.base_optimizer(optimizer)
    label = get_spec(base).label_for(plan.overrides(optimizer))
    return label if base == optimizer else f"{label} [{optimizer}]"


def warm_up(plan: Plan, stage: Stage, device: torch.device) -> None:
    """Pay this process's one-time costs before the first measured run: build the task, take one
    training step with the baseline and evaluate, then one step with every candidate.

    A run's CPU peak memory is what it adds to the resident set, and without this the first run (the
    baseline's) also paid for importing the task's and the optimizers' libraries and for torch's
    first use of each operation: 153 MiB of a digits run's 165 MiB, which made every candidate look
    smaller beside it. A candidate's first step also pays what it compiles (torchao's optimizers are
    torch.compile'd), once per process and parameter shapes: without its step here that fell in its
    first run only (88 MiB of torchao's 8-bit AdamW's first digits run, docs/compare.md). A task whose
    stages change the parameters' shapes compiles again in that stage's first run. Anything that fails
    here is left to the run, which records it.
    """
    try:
        task = get_task(plan.task, **plan.task_options)
        size = TaskSize(stage.steps, stage.batch_size, stage.train_examples, stage.eval_examples, stage.eval_every)
        work = task.build(seed=stage.seeds[0], size=size, device=device)
        base = plan.base_optimizer(plan.baseline)
        overrides = plan.overrides(plan.baseline)
        lr = float(overrides.pop("lr")) if "lr" in overrides else float(task.lr_for(base))
        opt = build_optimizer(base, work.model, lr, **overrides)
        work.loss(work.model, next(work.batches)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        work.evaluate(work.model)
        del opt
        for name in plan.candidates:
            cand = plan.base_optimizer(name)
            if get_spec(cand).installed():
                kwargs = plan.overrides(name)
                kwargs.pop("lr", None)
                try:
                    opt = build_optimizer(cand, work.model, 1e-3, **kwargs)
                    work.loss(work.model, next(work.batches)).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    del opt
                except Exception:
                    pass
        del work
    except Exception:
        pass
    gc.collect()


def run_one(
    plan: Plan, stage: Stage, optimizer: str, seed: int, device: torch.device, progress: ProgressBar | None = None
) -> dict[str, Any]:
    """Train one (optimizer, seed) at one stage and return its record."""
    task = get_task(plan.task, **plan.task_options)
    base = plan.base_optimizer(optimizer)
    overrides = plan.overrides(optimizer)
    # The plan's lr first; the task's table is looked up only without one (a task may have none).
    lr = float(overrides.pop("lr")) if "lr" in overrides else float(task.lr_for(base))
    row: dict[str, Any] = {
        "kind": "run",
        "plan": plan.name,
        "plan_fingerprint": plan.fingerprint(),
        "run_key": plan.run_key(stage, optimizer, seed),
        "task": plan.task,
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "stage": stage.name,
        "optimizer": optimizer,
        "base_optimizer": base,
        "label": run_label(plan, optimizer),
        "seed": seed,
        "lr": lr,
        "lr_schedule": plan.lr_schedule,
        "overrides": overrides,
        "steps": stage.steps,
        "batch_size": stage.batch_size,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "env": environment(device),
    }
    gc.collect()
    release_free_memory()
    rss_before = current_rss()  # None where it cannot be read (no /proc, no psutil): not measured
    # Linux: the resident set's high-water mark, which sees the temporaries inside a step too; elsewhere
    # samples of the resident set after each backward pass and step.
    high_water = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    size = TaskSize(stage.steps, stage.batch_size, stage.train_examples, stage.eval_examples, stage.eval_every)
    work = task.build(seed=seed, size=size, device=device)
    model = work.model
    opt = build_optimizer(base, model, lr, **overrides)
    sched = make_schedule(opt, plan.lr_schedule, stage.steps)
    peak = current_rss()

    def sample(peak: int | None) -> int | None:
        now = peak_rss() if high_water else current_rss()
        return None if peak is None or now is None else max(peak, now)

    losses: list[tuple[int, float]] = []
    evals: list[tuple[int, float]] = []
    step_times: list[float] = []
    opt_times: list[float] = []
    start = time.perf_counter()
    for step in range(1, stage.steps + 1):
        batch = next(work.batches)
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = work.loss(model, batch)
        loss.backward()
        peak = sample(peak)
        _sync(device)
        t1 = time.perf_counter()
        opt.step()
        _sync(device)
        t2 = time.perf_counter()
        if sched is not None:
            sched.step()
        peak = sample(peak)
        value = loss.item()
        losses.append((step, value))
        if step > WARMUP_STEPS or stage.steps <= WARMUP_STEPS:
            step_times.append(t2 - t0)
            opt_times.append(t2 - t1)
        if not math.isfinite(value):
            row["diverged_at"] = step
            break
        if stage.eval_every and step % stage.eval_every == 0 and step < stage.steps:
            evals.append((step, _metric(work.evaluate(model), task)))
        if progress:
            progress.update(step, f"loss {value:.4f}")
    total = time.perf_counter() - start
    metrics = work.evaluate(model)
    final = _metric(metrics, task)
    evals.append((stage.steps, final))
    n_params = sum(p.numel() for p in model.parameters())
    # Per trainable parameter: the optimizers are given those only, and a task that freezes part of its
    # model (a backbone) would otherwise show every optimizer's state as smaller than it is per parameter.
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sb = state_bytes(opt)
    row.update(
        status="ok",
        # As the records file holds it (tensors and NumPy scalars as numbers): the verdict of this run's
        # compare must see what a resumed one reads back.
        metrics={**json.loads(json.dumps(metrics, default=_json_value)), task.metric: final},
        loss_curve=_thin(losses),
        eval_curve=evals,
        final_train_loss=losses[-1][1] if losses else None,
        num_params=n_params,
        num_trainable_params=n_trained,
        state_bytes=sb,
        bytes_per_param=sb / n_trained if n_trained else None,
        rss_before_bytes=rss_before,
        peak_rss_bytes=peak,
        # On a CPU, what the run added to the resident set at its peak: the process's libraries and
        # whatever earlier runs left resident (a peer's library imported by its run, torch.compile's
        # caches) are the same for every optimizer, and counted whole they made the ratio depend on the
        # order of the runs (an identical copy of the baseline, run after torchao's 8-bit AdamW, measured
        # 1.22x; found by an audit). On CUDA the allocator's peak since the run began, which excludes
        # them the same way.
        peak_memory_bytes=(
            torch.cuda.max_memory_allocated(device)
            if device.type == "cuda"
            else (None if peak is None or rss_before is None else max(0, peak - rss_before))
        ),
        peak_memory_basis="allocator" if device.type == "cuda" else ("high-water" if high_water else "sampled"),
        step_time_median_s=median(step_times),
        optimizer_step_median_s=median(opt_times),
        total_time_s=total,
        info=work.info,
    )
    skipped = getattr(opt, "skipped_steps", None)
    if skipped is not None:
        row["skipped_steps"] = skipped
    del work, model, opt
    gc.collect()
    return row


def run_plan(
    plan: Plan,
    out_dir: Path,
    *,
    on_stage_done: Callable[[Stage, list[dict[str, Any]]], None] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run every stage of ``plan`` (resuming from ``out_dir/records.jsonl``); return all records.

    The records file may also hold runs of earlier versions of the plan (other seeds, settings):
    they are kept, but only runs under this plan's run keys are reused and judged.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise PlanError(f"--out {str(out_dir)!r} is a file, not a directory; give a new or existing directory")
    records_path = out_dir / "records.jsonl"
    records = read_records(records_path)
    if out_dir.is_dir() and not (out_dir / OUTPUT_MARKER).exists():
        # A folder compare did not make: its own files must not be overwritten or appended to. One made
        # before the marker existed is compare's if its records.jsonl holds compare's plan header (any
        # records.jsonl is not: a user's file of that name lost the report files beside it).
        taken = [n for n in ("records.jsonl", "report.md", "report.html") if (out_dir / n).exists()]
        if taken and not any(r.get("kind") == "plan" for r in records):
            raise PlanError(
                f"--out {str(out_dir)!r} already holds {' and '.join(taken)}, which compare did not write (no "
                f"{OUTPUT_MARKER} marker there, no plan header in a records.jsonl) and would overwrite or append "
                "to; give a new or empty --out"
            )
    _check_header(records, plan, records_path)
    # Everything that can stop the run is checked before anything is written.
    device = resolve_device(plan.device)
    task = get_task(plan.task, **plan.task_options)
    try:
        task.check()
    except MissingDependency as e:
        raise MissingDependency(f"task {plan.task!r} cannot run here: {e}") from e
    with contextlib.ExitStack() as stack:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / OUTPUT_MARKER).touch()  # before any run key: see OUTPUT_MARKER
            # The run keys' digest of the task options' files and folders, taken now, before any run: a
            # task that writes into its own data folder (a cache, a log) must not change the keys of
            # this compare's runs (the report would not find them).
            plan.freeze_data()
            stack.enter_context(_exclusive(out_dir))
            # Read again under the lock: another compare may have written since.
            records = read_records(records_path)
            header = _check_header(records, plan, records_path)
            if header is None:
                # The plan, with its acceptance bar, is written before any run starts.
                header = {
                    "kind": "plan",
                    "plan": plan.to_dict(),
                    "fingerprint": plan.fingerprint(),
                    "date": time.ctime(),
                }
                _append(records_path, header)
                records.append(header)
        except OSError as e:
            raise PlanError(
                f"--out {str(out_dir)!r} cannot be created or written ({e.strerror or e}); give a writable directory"
            ) from e
        return _run_stages(plan, device, records, records_path, on_stage_done, log)


def _check_header(records: list[dict[str, Any]], plan: Plan, records_path: Path) -> dict[str, Any] | None:
    """The records' plan header (None if there is none yet); PlanError if it fixed another bar or baseline."""
    header = next((r for r in records if r.get("kind") == "plan"), None)
    if header is not None and not (
        isinstance(header.get("plan"), dict) and isinstance(header["plan"].get("criteria"), dict)
    ):
        raise PlanError(
            f"{records_path}'s plan header holds no plan with its acceptance bar: the file is damaged or not "
            "compare's; give compare a new --out"
        )
    if header is not None and (
        header["plan"]["criteria"] != plan.to_dict()["criteria"] or header["plan"]["baseline"] != plan.baseline
    ):
        raise PlanError(
            f"{records_path} was started with another acceptance bar or baseline ({header['plan']['criteria']}, "
            f"baseline {header['plan']['baseline']!r}); the bar is fixed before the run. Use a new --out directory"
        )
    return header


@contextlib.contextmanager
def _exclusive(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir``'s lock (``out_dir/.lock``, an advisory ``flock``) while a compare writes there.

    Two compares in one directory would run the same runs twice and interleave their rows: the second
    is refused, naming the first. The lock goes with the process, so a killed compare leaves none
    behind. Where ``fcntl`` is missing (Windows) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(out_dir / ".lock", "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise PlanError(
                f"another microadam compare ({holder}) is writing to {str(out_dir)!r}: two would run the same runs "
                "twice. Wait for it to end (rerunning this command then resumes from its records), or give another "
                "--out"
            ) from e
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        yield


def _run_stages(
    plan: Plan,
    device: torch.device,
    records: list[dict[str, Any]],
    records_path: Path,
    on_stage_done: Callable[[Stage, list[dict[str, Any]]], None] | None,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """The stages of :func:`run_plan`, in ``records_path``'s directory, which it holds."""
    from microadam.bench.verdict import judge_stage

    # Only finished runs are reused: a run that failed or whose optimizer was not installed is
    # tried again, so installing the package or fixing the cause and rerunning is enough.
    done = {r["run_key"]: r for r in records if r.get("kind") == "run" and r.get("status") == "ok"}
    last_try = {r["run_key"]: r for r in records if r.get("kind") == "run" and "run_key" in r}
    alive = list(plan.candidates)
    warm = False
    for si, stage in enumerate(plan.stages):
        if not alive:
            log(f"stage {stage.name}: not run, no candidate passed the previous stage")
            break
        todo = [(o, s) for o in [plan.baseline, *alive] for s in stage.seeds]
        log(
            f"stage {si + 1}/{len(plan.stages)} '{stage.name}': {stage.steps} steps x batch {stage.batch_size}, "
            f"seeds {list(stage.seeds)}, optimizers {[plan.baseline, *alive]}"
        )
        stage_rows = []
        for i, (opt_name, seed) in enumerate(todo):
            key = plan.run_key(stage, opt_name, seed)
            if key in done:
                stage_rows.append(done[key])
                log(f"  [{i + 1}/{len(todo)}] {opt_name} seed {seed}: recorded earlier, not rerun")
                continue
            label = f"  [{i + 1}/{len(todo)}] {stage.name} {opt_name} seed {seed}"
            if key in last_try:
                log(f"{label}: tried again (last time {last_try[key]['status']}: {last_try[key].get('message', '')})")
            spec = get_spec(plan.base_optimizer(opt_name))
            failed = dict(
                kind="run",
                run_key=key,
                stage=stage.name,
                optimizer=opt_name,
                seed=seed,
                label=run_label(plan, opt_name),
            )
            if not spec.installed():
                row = {**failed, "status": "not_installed", "message": f"not installed: {spec.install}"}
                log(f"{label}: {spec.label} is not installed ({spec.install})")
            else:
                if not warm:
                    log("  warming up (the task built, one step of every optimizer; not measured)")
                    warm_up(plan, stage, device)
                    warm = True
                try:
                    row = run_one(plan, stage, opt_name, seed, device, ProgressBar(stage.steps, label))
                except (NotInstalled, MissingDependency) as e:
                    row = {**failed, "status": "not_installed", "message": str(e)}
                except Exception as e:  # one failing optimizer must not lose the others' results
                    row = {
                        **failed,
                        "status": "error",
                        "message": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc(limit=5),
                    }
                    log(f"{label}: failed: {type(e).__name__}: {e}")
            _append(records_path, row)
            records.append(row)
            stage_rows.append(row)
        judgement = judge_stage(plan, stage, stage_rows)
        for cand, result in judgement.items():
            if not result["passed"] and cand in alive:
                alive.remove(cand)
                failed = [ch["detail"] for ch in result["criteria"] if not ch["passed"]]
                why = result.get("reason") or "; ".join(failed)
                later = "; not run in later stages" if si + 1 < len(plan.stages) else ""
                log(f"  {cand}: {'INVALID' if result.get('invalid') else 'FAIL'}: {why}{later}")
        if on_stage_done:
            on_stage_done(stage, stage_rows)
    return records
