"""Watching a run, rolling back to the last good state, adjusting compression.

The guard sits between ``loss.backward()`` and ``optimizer.step()``::

    guard = Guard(model, optimizer, GuardPolicy(snapshot_every=100, log_path="guard.jsonl"))
    for batch in loader:
        loss = model(batch)
        loss.backward()
        guard.step(loss)          # checks; steps the optimizer, or skips / rolls back / adjusts
        optimizer.zero_grad()

What it sees, and what it does by default (every action is a declared policy):

================================  ==========================================================
seen                              default actions
================================  ==========================================================
non-finite loss or gradient       ``skip`` the step; after ``patience`` in a row, ``rollback``
loss spike (> ``spike_factor`` x  ``rollback`` to the last good snapshot, ``lower_lr``
the running median, twice in a    (a single outlier batch is only logged)
row: ``spike_patience``)
error-feedback drift (``||e|| /   ``raise_density`` (state converted, nothing lost); at the
||g||`` above ``max_error_ratio``)  density ceiling, ``fallback_adamw``
behind a reference loss curve by  ``rollback``, then ``fallback_adamw`` (dense AdamW
more than ``reference_margin``    initialised from the window's moments)
================================  ==========================================================

Snapshots (model, optimizer, RNG states, the guard's own counters) are kept in
CPU memory every ``snapshot_every`` healthy steps (a snapshot copies the model and
the optimizer state: with MicroAdam about 1.23x the fp32 weights' bytes, against 3x
with AdamW; ``keep_snapshots`` of them) and, with ``checkpoint_dir``, written to disk
atomically (write to a temporary file, fsync, rename): a crash mid-write leaves
the previous checkpoint intact. Every event is one JSONL line, the one that raises
``RuntimeError`` included.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import numbers
import os
import random
import statistics
import sys
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from microadam.optimizer import local_tensor, plain_number

__all__ = ["Guard", "GuardPolicy", "GuardEvent", "save_atomic", "load_checkpoint"]

ACTIONS = {"skip", "rollback", "lower_lr", "raise_density", "raise_window", "fallback_adamw", "raise", "none"}


@dataclass
class GuardPolicy:
    """What the guard watches and what it does.

    Attributes:
        snapshot_every: healthy steps between snapshots of the last good state.
        checkpoint_dir: also write each snapshot there atomically (``guard-last.pt``; one
            ``guard-last.rank<r>.pt`` per rank when several run), and rewrite it
            after every action that changes the state the run continues from (a rollback, lower_lr,
            raise_density, raise_window, fallback_adamw).
        patience: consecutive non-finite steps (or reference-curve misses) before escalating.
        spike_factor, spike_min_delta, spike_window, warmup: a loss above ``spike_factor`` times
            the median of the last ``spike_window`` losses, and above it by at least
            ``spike_min_delta`` (loss units), and above every loss in that window, is a spike; not
            checked in the first ``warmup`` (>= 1) steps. ``on_spike`` acts at the ``spike_patience``-th
            spike in a row; an earlier one is logged (action ``none``), its step goes ahead, and its
            loss stays out of the history. A single outlier batch is common near convergence
            (measured: the healthy run of ``examples/guard_demo.py --no-faults`` had 4 batches at 18x
            to 480x the median, e.g. 0.108 against 0.006, none followed by another; with patience 1
            the first was rolled back and the lr halved for nothing), while weights that a bad step
            has damaged keep the loss up on the next batch as well. The absolute floor and the new-high rule matter
            near convergence, where per-batch noise is several times the median (measured: without
            them the digits demo in ``examples/guard_demo.py`` rolled back on noise after its loss
            fell below 0.1).
        max_error_ratio: error-feedback norm over gradient norm that counts as drift (None: off).
        error_check_every: steps between error-feedback checks (each costs one pass over the codes).
        auto_density: ``(min, max)`` to adapt density from the measured error ratio: raised by
            ``density_factor`` above ``max_error_ratio``, lowered below ``min_error_ratio``.
        reference_curve: ``[(step, loss), ...]`` of a baseline run (e.g. a ``microadam compare``
            record's ``loss_curve``); the mean of the last ``spike_window`` losses may exceed the
            reference's by at most ``reference_margin`` (relative). The reference is read at the step
            the weights were trained to: the running step less the steps rollbacks undid and the steps
            the guard skipped.
        on_nonfinite, on_spike, on_error_drift, on_behind_reference: the actions, in order.
        lr_factor: ``lower_lr`` multiplies every group's lr, and every lr the scheduler computes
            from, by it (see :class:`Guard`'s ``scheduler``).
        density_factor, max_density, window_step, max_window: how far compression may be relaxed
            (``density_factor > 1``, ``0 < max_density <= 1``, ``window_step >= 1``).
        keep_snapshots: snapshots kept; repeated rollbacks with no new snapshot in between go
            one snapshot further back each time.
        max_rollbacks: more rollbacks than this raises ``RuntimeError`` (a run that keeps failing
            needs a person). Counted per run: a resumed run (``resume=``) gets its own.
        max_total_rollbacks: more rollbacks than this over the run and every run it resumed raises
            ``RuntimeError`` too (None: no such cap). Set it where a failed job restarts and resumes
            by itself (torchrun ``--max-restarts``, a requeued job), so a run that keeps degrading
            stops for good.
        log_path: the JSONL event log (written by rank 0 when several ranks run: they take the
            same decisions).
    """

    snapshot_every: int = 100
    checkpoint_dir: str | None = None
    patience: int = 3
    spike_factor: float = 3.0
    spike_min_delta: float = 0.1
    spike_window: int = 20
    spike_patience: int = 2
    warmup: int = 10
    max_error_ratio: float | None = None
    min_error_ratio: float | None = None
    error_check_every: int = 50
    auto_density: tuple[float, float] | None = None
    reference_curve: list[tuple[int, float]] | None = None
    reference_margin: float = 0.1
    on_nonfinite: tuple[str, ...] = ("skip",)
    on_spike: tuple[str, ...] = ("rollback", "lower_lr")
    on_error_drift: tuple[str, ...] = ("raise_density",)
    on_behind_reference: tuple[str, ...] = ("rollback", "fallback_adamw")
    lr_factor: float = 0.5
    density_factor: float = 2.0
    max_density: float = 0.1
    window_step: int = 10
    max_window: int = 40
    max_rollbacks: int = 5
    max_total_rollbacks: int | None = None
    keep_snapshots: int = 3
    log_path: str | None = None

    def __post_init__(self) -> None:
        for name in ("on_nonfinite", "on_spike", "on_error_drift", "on_behind_reference"):
            value = getattr(self, name)
            if isinstance(value, str):  # ("skip") is a string, not a tuple: a common slip
                raise TypeError(f"{name} must be a tuple of actions, got the string {value!r}; write ({value!r},)")
            try:
                actions = tuple(value)
            except TypeError:
                raise TypeError(
                    f"{name} must be a tuple of actions, got {type(value).__name__} {value!r}; write e.g. "
                    f"{name}=('skip',), or ('none',) to only log the event"
                ) from None
            bad = [a for a in actions if a not in ACTIONS]
            if bad:
                raise ValueError(f"{name}: unknown action {bad[0]!r}; choose from {sorted(ACTIONS)}")
            setattr(self, name, actions)
        for name in ("checkpoint_dir", "log_path"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, (str, os.PathLike)):
                    raise TypeError(f"{name} must be a path (str) or None, got {type(value).__name__} {value!r}")
                setattr(self, name, os.fspath(value))
        why = {
            "snapshot_every": "healthy steps between snapshots",
            "patience": "events in a row before escalating",
            "spike_window": "losses the median is taken over",
            "spike_patience": "spikes in a row before on_spike acts",
            # The spike check compares a loss with the median of earlier ones: with warmup=0 the
            # first step has none (statistics.median of nothing raises).
            "warmup": "steps before spikes are checked; the first check needs an earlier loss",
            "error_check_every": "steps between error-feedback checks",
            "window_step": "slots added by raise_window",
            "max_window": "the window raise_window may reach",
            "max_rollbacks": "rollbacks before the guard asks for a person",
            "keep_snapshots": "snapshots kept",
        }
        for name, meaning in why.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int ({meaning}), got {type(value).__name__} {value!r}")
            value = int(value)  # a NumPy integer as a Python one, as MicroAdam takes them
            setattr(self, name, value)
            if value < 1:
                raise ValueError(f"{name} must be >= 1 ({meaning}), got {value}; use 1 or more")
        for name in ("spike_factor", "spike_min_delta", "reference_margin", "lr_factor", "density_factor",
                     "max_density", "max_error_ratio", "min_error_ratio"):  # fmt: skip
            value = getattr(self, name)
            if value is None and name in ("max_error_ratio", "min_error_ratio"):
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
            value = float(value)
            setattr(self, name, value)
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        if self.spike_factor <= 1:
            raise ValueError(
                f"spike_factor must be > 1 (a spike is a loss this many times the median), got {self.spike_factor}"
            )
        for name in ("spike_min_delta", "reference_margin"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (a margin in loss units or relative), got {getattr(self, name)}")
        if not 0 < self.lr_factor < 1:
            raise ValueError(f"lr_factor must be in (0, 1) (lower_lr multiplies the lr by it), got {self.lr_factor}")
        if self.density_factor <= 1:
            raise ValueError(
                f"density_factor must be > 1 (raise_density multiplies the density by it), got {self.density_factor}"
            )
        if not 0 < self.max_density <= 1:
            raise ValueError(f"max_density must be in (0, 1] (a fraction of the coordinates), got {self.max_density}")
        if self.max_error_ratio is not None and self.max_error_ratio <= 0:
            raise ValueError(f"max_error_ratio must be > 0 or None (off), got {self.max_error_ratio}")
        if self.min_error_ratio is not None:
            if self.min_error_ratio < 0:
                raise ValueError(f"min_error_ratio must be >= 0 or None (off), got {self.min_error_ratio}")
            if self.max_error_ratio is not None and self.min_error_ratio >= self.max_error_ratio:
                raise ValueError(
                    f"min_error_ratio ({self.min_error_ratio}) must be below max_error_ratio ({self.max_error_ratio}), "
                    "else the density would be raised and lowered on the same measurement"
                )
        if self.max_total_rollbacks is not None:
            value = self.max_total_rollbacks
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(
                    f"max_total_rollbacks must be an int >= 1 (rollbacks over every resume) or None, got {value!r}"
                )
            self.max_total_rollbacks = int(value)
        if self.auto_density is not None:
            try:
                lo, hi = self.auto_density
                ok = 0 < lo <= hi <= 1
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"auto_density must be (min, max) with 0 < min <= max <= 1, got {self.auto_density!r}")
            self.auto_density = (lo, hi)
            if self.max_error_ratio is None:
                raise ValueError("auto_density needs max_error_ratio (and optionally min_error_ratio) to steer by")
        if self.reference_curve is not None:
            curve = []
            for i, point in enumerate(self.reference_curve):
                try:
                    step, loss = point
                    # Any real numbers (np.arange steps, np.float32 losses), kept as Python ones.
                    ok = all(not isinstance(v, bool) and isinstance(v, numbers.Real) for v in (step, loss))
                    if ok:
                        step = int(step) if isinstance(step, numbers.Integral) else float(step)
                        loss = float(loss)
                    ok = ok and step >= 0 and math.isfinite(step) and math.isfinite(loss)
                except (TypeError, ValueError):
                    ok = False
                if not ok:
                    raise ValueError(
                        f"reference_curve[{i}] must be a (step, loss) pair of numbers with step >= 0 and a finite "
                        f"loss, got {point!r}"
                    )
                curve.append((step, loss))
            if not curve:
                raise ValueError("reference_curve is empty; pass None to turn the reference check off")
            self.reference_curve = curve


def _loss_value(loss: Any) -> float:
    """``loss`` as a Python float; ``TypeError``/``ValueError`` saying what to pass for anything but one number."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"the guard judges one loss per step, got a tensor of shape {tuple(loss.shape)} (per-sample losses?); "
                "pass the reduced loss (loss.mean()); nothing was changed"
            )
        return float(loss.detach())
    try:
        if isinstance(loss, (bool, str, bytes)):
            raise TypeError
        return float(loss)  # a Python or NumPy number, a one-element array
    except (TypeError, ValueError):
        raise TypeError(
            f"the guard judges one loss per step, got {type(loss).__name__} {loss!r}; pass the loss as a number or a "
            "one-element tensor; nothing was changed"
        ) from None


@dataclass
class GuardEvent:
    step: int
    event: str
    seen: dict[str, Any]
    actions: list[str]
    result: dict[str, Any] = field(default_factory=dict)


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` that never leaves a half-written file at ``path``: temp file, fsync, rename.

    A write that fails removes its temp file; temp files left by writers killed mid-write (their
    process id no longer runs on this machine) are removed after the next successful write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{_tmp_prefix(path)}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass
    _remove_stale_temps(path)


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def _writer_gone(pid: int) -> bool:
    """Whether the process that wrote a temp file (named by its pid) can no longer finish it."""
    if pid == os.getpid():
        return True  # this process's own temp file was just renamed: any other one is a leftover
    if os.name != "posix":  # pragma: no cover - no signal-0 probe: keep what may be another writer's
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


def _remove_stale_temps(path: Path) -> None:
    """Remove ``path``'s temp files whose writer is gone (a SIGKILL or power loss mid-write leaves them)."""
    prefix = _tmp_prefix(path)
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            pid = entry.name[len(prefix) :]
            # A live writer's temp file must stay: removing it would fail that writer's rename.
            if entry.name.startswith(prefix) and pid.isdigit() and _writer_gone(int(pid)):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a guard checkpoint with ``weights_only=True``."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _to_cpu(obj: Any) -> Any:
    """A copy of ``obj`` with its tensors on the CPU and its NumPy scalars as Python numbers (a scheduler's
    lambda returning ``np.float32`` puts them in the lrs; the checkpoint must load with weights_only=True)."""
    plain = plain_number(obj)
    if plain is not obj:
        return plain
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def _scheduler_anchors(scheduler: Any) -> tuple[list[tuple[Any, str]], set[str], list[str]]:
    """Where ``scheduler`` keeps the learning rates it computes the next one from.

    Returns ``(attributes, group_keys, unknown)``: the ``(object, name)`` attributes holding lrs
    (lists or scalars), the param-group keys holding lrs besides ``lr``, and the names of
    schedulers whose anchors the guard does not know (only their ``base_lrs`` are scaled).

    Every torch schedule is linear in its lrs, so scaling all of them (and the groups' current lr)
    scales every later lr by the same factor. Scaling ``base_lrs`` alone is not enough: OneCycleLR
    reads ``initial_lr``/``max_lr``/``min_lr`` from the groups, CyclicLR its ``max_lrs``, the cosine
    schedules ``eta_min``, and SequentialLR/ChainedScheduler hand the step to children that keep
    their own ``base_lrs`` (measured: each undid a 0.5x ``lower_lr`` within a few steps).
    """
    from torch.optim import lr_scheduler as S

    base_only = (S.LambdaLR, S.MultiplicativeLR, S.StepLR, S.MultiStepLR, S.ConstantLR, S.LinearLR,
                 S.ExponentialLR, S.PolynomialLR)  # fmt: skip
    attrs: list[tuple[Any, str]] = []
    keys: set[str] = {"initial_lr"}  # LRScheduler's own record of the starting lr
    unknown: list[str] = []

    def visit(sched: Any) -> None:
        inner = getattr(sched, "scheduler", None)
        if not isinstance(sched, (S.LRScheduler, S.ReduceLROnPlateau)) and inner is not None:
            visit(inner)  # a wrapper (accelerate's AcceleratedScheduler) steps the scheduler it holds
            return
        attrs.append((sched, "_last_lr"))  # what get_last_lr() reports until the next step
        if isinstance(sched, (S.SequentialLR, S.ChainedScheduler)):
            for child in sched._schedulers:
                visit(child)
        elif isinstance(sched, base_only):
            attrs.append((sched, "base_lrs"))
        elif isinstance(sched, (S.CosineAnnealingLR, S.CosineAnnealingWarmRestarts)):
            attrs.extend([(sched, "base_lrs"), (sched, "eta_min")])
        elif isinstance(sched, S.CyclicLR):
            attrs.extend([(sched, "base_lrs"), (sched, "max_lrs")])
        elif isinstance(sched, S.OneCycleLR):
            keys.update(("max_lr", "min_lr"))
        elif isinstance(sched, S.ReduceLROnPlateau):
            attrs.extend([(sched, "min_lrs"), (sched, "default_min_lr")])
        else:
            attrs.append((sched, "base_lrs"))
            unknown.append(type(sched).__name__)

    if scheduler is not None:
        visit(scheduler)
    return attrs, keys, unknown


def _scale_lr(optimizer: torch.optim.Optimizer, scheduler: Any, factor: float) -> list[str]:
    """Multiply every lr of ``optimizer``'s groups and of ``scheduler`` by ``factor``; return the
    scheduler types it could not vouch for (see :func:`_scheduler_anchors`)."""
    attrs, keys, unknown = _scheduler_anchors(scheduler)
    for group in optimizer.param_groups:
        for key in ("lr", *sorted(keys)):
            if key not in group:
                continue
            if isinstance(group[key], torch.Tensor):  # a tensor lr (capturable, fused) keeps its identity
                group[key].mul_(factor)
            else:
                group[key] = group[key] * factor
    seen: set[tuple[int, str]] = set()
    for obj, name in attrs:
        value = getattr(obj, name, None)
        if (id(obj), name) in seen or value is None or isinstance(value, bool):
            continue
        seen.add((id(obj), name))
        if isinstance(value, (list, tuple)):
            setattr(obj, name, [v * factor for v in value])
        elif isinstance(value, (int, float, torch.Tensor)):
            setattr(obj, name, value * factor)
    return unknown


def _numpy_rng_state() -> dict[str, Any] | None:
    """numpy's global RNG (``np.random.*``), if numpy is already imported (the guard never imports it).

    Stored as tensors and numbers so that ``load_checkpoint`` (``weights_only=True``) reads it back.
    Generators a program owns (``np.random.default_rng``) are its own to restore.
    """
    np = sys.modules.get("numpy")
    if np is None:
        return None
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    if kind != "MT19937":  # pragma: no cover - the legacy global RNG is always MT19937
        return None
    keys = torch.from_numpy(keys.astype(np.int64))
    return {"keys": keys, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}


def _set_numpy_rng_state(state: dict[str, Any]) -> None:
    np = sys.modules["numpy"]
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["pos"], state["has_gauss"], state["cached_gaussian"]))


def _unscaled(scaler: Any, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``scaler.unscale_(optimizer)`` ran since the scaler's last update (torch's own record of it,
    which has no public reader; False where it cannot be read)."""
    try:
        from torch.amp.grad_scaler import OptState

        return scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.UNSCALED
    except (AttributeError, ImportError, KeyError, TypeError):
        return False


def _enabled(scaler: Any) -> bool:
    """Whether ``scaler`` is a GradScaler that scales (a disabled one, fp32 or bf16 runs, holds no state)."""
    return scaler is not None and callable(getattr(scaler, "is_enabled", None)) and bool(scaler.is_enabled())


def unscaled_grad_scale(scaler: Any, optimizer: torch.optim.Optimizer, *, unscale: bool = True) -> float | None:
    """A framework's fp16 ``GradScaler``'s scale this step, once ``optimizer``'s gradients are unscaled
    (``None`` without an enabled scaler): for :meth:`Guard.before_step`'s ``grad_scale`` in loops that
    step through the scaler themselves (the Trainer and Lightning callbacks).

    The guard must judge the true gradients (the range check, the error-drift ratio) and must know
    the scale to tell an fp16 overflow, which the scaler skips and handles, from the model's own
    non-finite gradient. Frameworks have usually unscaled them already (to clip or to measure the
    norm); where they have not, this does, once. ``unscale_`` also records the inf check that
    ``scaler.step`` uses: on a step the guard skips by dropping the gradients, the scaler still sees
    the overflow, skips the step too and lowers its scale. ``unscale=False``, for a framework that may
    not step the scaler this time (Lightning, after a ``training_step`` that returned None): the scale
    only if the framework unscaled, else None (an unscale_ with no step and update after it would
    leave the scaler mid-step, and the next batch's unscale_ would raise).
    """
    if not _enabled(scaler):
        return None
    if not unscale:
        return float(scaler.get_scale()) if _unscaled(scaler, optimizer) else None
    try:
        scaler.unscale_(optimizer)
    except RuntimeError as e:
        # It runs once per step, and the framework ran it. Any other failure is not ours to hide.
        if "already been called" not in str(e):
            raise
    return float(scaler.get_scale())


def _values_of(grad: torch.Tensor) -> torch.Tensor:
    """The values a gradient holds, as a dense tensor the range check can reduce: a sparse gradient's
    stored values (``nn.Embedding(sparse=True)`` with ``torch.optim.SparseAdam``), the tensor itself
    otherwise. Coalesced first: an index given twice is added, as the optimizer will."""
    if grad.layout == torch.sparse_coo:
        return grad.coalesce().values()
    if grad.layout != torch.strided:
        return grad.values()  # compressed layouts (CSR, ...) store each element once
    return grad


class Guard:
    """Watch a training run through its loss and its optimizer; act on degradation.

    Args:
        model: the module being trained.
        optimizer: any torch optimizer; compression actions need :class:`~microadam.MicroAdam`.
        policy: a :class:`GuardPolicy` (default: skip non-finite steps, roll back on spikes).
        scheduler: the LR scheduler; a rollback restores it with the optimizer, and ``lower_lr``
            scales every lr it computes from (every ``torch.optim.lr_scheduler`` type,
            SequentialLR and ChainedScheduler through their children, and the LambdaLR-based
            Hugging Face schedules; for any other type only its ``base_lrs``, with a warning).
        scaler: the loop's fp16 ``torch.amp.GradScaler``, if any: snapshots and the checkpoint hold its
            state (scale, growth tracker), a rollback restores the scale that was healthy with the
            restored weights, and ``resume`` continues from the saved scale instead of the initial one
            (whose overflows would skip a resumed run's first steps). :meth:`step` uses it when called
            without one; a scaler first passed to :meth:`step` is kept from then on. Under accelerate the
            prepared optimizer's scaler is used without it.
        start_step: the number of steps already done when the guard starts (a resumed run: Trainer's
            ``global_step``), so that ``reference_curve`` is read at the right step. Default 0. Build
            the guard when the scheduler is where the next step needs it (after a restored checkpoint's
            ``scheduler.step()``, if the recipe has one): its first snapshot takes it as it is.
        resume: ``True`` (this process's :meth:`checkpoint_path`) or a path to a guard checkpoint: first
            restore the model, optimizer, scheduler, RNG states and the guard's counters (step,
            recent losses, lr scale, the reference's lag) from it. Default ``False``: a new run. The
            resumed run gets ``max_rollbacks`` of its own (``rollbacks`` starts at 0; the earlier runs'
            count is ``rollbacks_before_resume``).

    A new guard writes its first snapshot to ``checkpoint_dir`` at once: to continue a run from
    that directory, pass ``resume``, or load ``guard-last.pt`` before constructing the guard.
    """

    # Actions after which the on-disk checkpoint is rewritten: the run continues from a state that
    # differs from the last one written (a rollback restores an older one, the others change lr,
    # density, window or the update rule), and the runbook tells people to reload from disk.
    _CHANGES_STATE = frozenset({"rollback", "lower_lr", "raise_density", "raise_window", "fallback_adamw"})

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        policy: GuardPolicy | None = None,
        scheduler: Any = None,
        *,
        scaler: Any = None,
        start_step: int | None = None,
        resume: bool | str | os.PathLike[str] = False,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"Guard's model must be a torch.nn.Module, got {type(model).__name__}: Guard(model, optimizer)"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"Guard's optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}: "
                "Guard(model, optimizer, policy), with an optimizer wrapper's inner optimizer if need be"
            )
        if policy is not None and not isinstance(policy, GuardPolicy):
            raise TypeError(
                f"Guard's policy must be a GuardPolicy or None (the defaults), got {type(policy).__name__} "
                f"{policy!r}: pass GuardPolicy(**settings)"
            )
        if scaler is not None and not all(
            callable(getattr(scaler, name, None)) for name in ("state_dict", "load_state_dict", "unscale_", "update")
        ):
            raise TypeError(
                f"Guard's scaler must be a torch.amp.GradScaler (or None), got {type(scaler).__name__} {scaler!r}: "
                "Guard(model, optimizer, policy, scheduler, scaler=torch.amp.GradScaler(device))"
            )
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.scaler = scaler
        self.policy = policy or GuardPolicy()
        if start_step is not None:
            if isinstance(start_step, bool) or not isinstance(start_step, int):
                raise TypeError(f"start_step must be an int (steps already done), got {type(start_step).__name__}")
            if start_step < 0:
                raise ValueError(f"start_step must be >= 0 (steps already done), got {start_step}")
            if resume is not False:
                raise ValueError("pass start_step or resume, not both: resume takes the step from the checkpoint")
        self.step_count = start_step or 0
        self.losses: deque[float] = deque(maxlen=self.policy.spike_window)
        self.nonfinite_run = 0
        self.behind_run = 0
        self.spike_run = 0
        self.rollbacks = 0
        self.rollbacks_before_resume = 0  # those of the runs this one resumed (resume=...)
        self.lr_scale = 1.0  # product of every lower_lr so far
        # Steps that rollbacks undid or the guard skipped: the weights were trained for
        # step_count - reference_lag steps, and reference_curve is read there (at step_count, a healthy
        # run rolled back on a steep curve looks behind and is rolled back again, one snapshot further
        # each time).
        self.reference_lag = 0
        self.events: list[GuardEvent] = []
        self._micro_losses: list[float] = []  # an accelerate accumulation window's losses so far (step)
        self._in_step = False  # inside step(), where a rollback's scaler state waits for scaler.update()
        self._scaler_to_restore: tuple[Any, dict[str, Any]] | None = None
        self._snapshots: deque[dict[str, Any]] = deque(maxlen=self.policy.keep_snapshots)
        self._rolled_back_since_snapshot = False
        self._healthy_since_snapshot = 0
        self._pending_loss: float | None = None
        self._pending_drift: dict[str, Any] | None = None
        # Whether the scheduler is already stepped for the step about to run. Inside a step (a plain loop,
        # Trainer: the loop steps the scheduler after guard.step) it is not: the snapshots taken there
        # and the checkpoints written there are not (the resume recipe steps it once). Before the first
        # step it is, and after a rollback to a snapshot taken then (see hold_schedule).
        self._scheduler_stepped = False
        # The schedule a rollback restored, to put back at the next step if the loop stepped the scheduler
        # in between (see hold_schedule).
        self._held_schedule: tuple[dict[str, Any], list[dict[str, Any]]] | None = None
        # Loops whose snapshots are all taken after the scheduler's step restore the schedule themselves
        # after a rollback (the Lightning callback) and set this False.
        self.restores_schedule = True
        p = self.policy
        unknown = _scheduler_anchors(scheduler)[2]
        if unknown and any(
            "lower_lr" in a for a in (p.on_nonfinite, p.on_spike, p.on_error_drift, p.on_behind_reference)
        ):
            warnings.warn(
                f"Guard: lower_lr can scale only base_lrs of {', '.join(unknown)} (it knows every "
                "torch.optim.lr_scheduler type and Hugging Face's LambdaLR-based schedules); if it computes "
                "its lr from anything else, its next step undoes the lowering. Pass a known scheduler, or "
                "drop 'lower_lr' from the policy's actions.",
                stacklevel=2,
            )
        if scheduler is None and any("initial_lr" in g for g in optimizer.param_groups):
            # Every torch scheduler leaves initial_lr in the groups it drives.
            warnings.warn(
                "Guard: the optimizer has a learning-rate scheduler (its param_groups hold 'initial_lr') but none "
                "was passed: a rollback cannot put the schedule back with the weights, and the scheduler's next "
                "step undoes lower_lr. Pass it: Guard(model, optimizer, policy, scheduler=scheduler)",
                stacklevel=2,
            )
        if resume is not False:
            self._resume(resume)  # sets _scheduler_stepped from the checkpoint
        else:
            # Built before the first step (or, with start_step, after a loop restored a schedule that
            # is where the next step needs it): the scheduler is already stepped for the next step.
            self._scheduler_stepped = scheduler is not None
        self.take_snapshot()
        if resume is not False and self._scheduler_stepped and scheduler is not None:
            # The resume recipe steps the scheduler once ("finish that step", right for a checkpoint
            # written inside a step); this one was written with it already stepped: undo that step.
            self.hold_schedule()

    # ------------------------------------------------------------ snapshots

    def _state(self) -> dict[str, Any]:
        py = random.getstate()
        return {
            "model": _to_cpu(self.model.state_dict()),
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": list(py[1]),
                # random.gauss() caches its second normal: without it a restored stream differs.
                "python_gauss_next": py[2],
                "numpy": _numpy_rng_state(),
            },
            "scheduler": _to_cpu(self.scheduler.state_dict()) if self.scheduler is not None else None,
            "scaler": self._scaler_state(),
            "guard": {**self.counters(), "scheduler_stepped": self._scheduler_stepped},
            "outside_params": {i: _to_cpu(local_tensor(p)) for i, p in self._outside_params()},
        }

    def _snapshot_scaler(self) -> Any:
        """The GradScaler whose state the snapshots hold: the one given (or first passed to :meth:`step`),
        else the one accelerate's prepared optimizer holds under fp16; None without an enabled one."""
        scaler = self.scaler
        if scaler is None and hasattr(self.optimizer, "optimizer"):
            scaler = getattr(self.optimizer, "scaler", None)
        return scaler if _enabled(scaler) else None

    def _scaler_state(self) -> dict[str, Any] | None:
        if self._scaler_to_restore is not None:
            # A rollback inside step() has yet to load it (after this step's update): it is the state the
            # next step starts from, and what a checkpoint written now must hold.
            return _to_cpu(self._scaler_to_restore[1])
        scaler = self._snapshot_scaler()
        # _to_cpu: a scaler built with NumPy numbers (init_scale=np.float32(...)) must load with weights_only.
        return None if scaler is None else _to_cpu(dict(scaler.state_dict()))

    def _outside_params(self) -> list[tuple[int, torch.Tensor]]:
        """The optimizer's parameters that are not the model's (a loss module's temperature, a head built
        apart), with their positions among all of the optimizer's: the model's state_dict does not hold
        them, and a rollback that restored their optimizer state but not their values would pair the
        two wrongly (and never undo a NaN in one)."""
        mine = {id(p) for p in self.model.parameters()}
        every = [p for g in self.optimizer.param_groups for p in g["params"]]
        return [(i, p) for i, p in enumerate(every) if id(p) not in mine]

    def checkpoint_path(self) -> Path | None:
        """Where this process writes (and ``resume=True`` reads) its checkpoint: ``guard-last.pt`` in
        ``checkpoint_dir``, or ``guard-last.rank<r>.pt`` when several ranks run (each holds its own
        shard's model and optimizer state under FSDP, so one shared file would hold one rank's)."""
        if not self.policy.checkpoint_dir:
            return None
        name = "guard-last.pt"
        if self._distributed() and torch.distributed.get_world_size() > 1:
            name = f"guard-last.rank{torch.distributed.get_rank()}.pt"
        return Path(self.policy.checkpoint_dir) / name

    def _write_checkpoint(self, state: dict[str, Any]) -> None:
        path = self.checkpoint_path()
        if path is not None:
            save_atomic(state, path)

    def take_snapshot(self) -> None:
        """Remember the current state as the last good one (and write it to disk if configured)."""
        snap = self._state()
        self._snapshots.append(snap)
        self._healthy_since_snapshot = 0
        self._rolled_back_since_snapshot = False
        self._write_checkpoint(snap)

    def _restore(self, snap: dict[str, Any]) -> None:
        """Load a snapshot's model, optimizer, scheduler and RNG states in place."""
        # The snapshot may predate a change of density, window or a fallback: restore the
        # configuration it was taken under before its state (load_state_dict checks they agree).
        # A load that fails part-way is undone by _restore_or_put_back.
        for group, saved in zip(self.optimizer.param_groups, snap["optimizer"]["param_groups"]):
            for key in ("density", "window", "dense"):
                if key in saved:
                    group[key] = saved[key]
        saved_scaler, scaler = snap.get("scaler"), self._snapshot_scaler()  # absent from older checkpoints
        if saved_scaler and scaler is not None:
            saved_scale = saved_scaler.get("scale")
            if not (isinstance(saved_scale, (int, float)) and math.isfinite(saved_scale) and saved_scale > 0):
                # A NaN scale would make every later gradient NaN, each step skipped for it.
                raise ValueError(f"the saved GradScaler scale is {saved_scale!r}; it must be a finite number > 0")
        outside = self._outside_params()
        saved_outside = snap.get("outside_params")  # absent from checkpoints written before it
        if saved_outside is not None:
            have = {i: tuple(local_tensor(p).shape) for i, p in outside}
            held = {i: tuple(t.shape) for i, t in saved_outside.items()}
            if have != held:
                raise ValueError(
                    f"the optimizer's parameters outside the model (position: shape) are {have} here but {held} "
                    "in the snapshot; pass the same parameters to the optimizer, in the same order"
                )
        self.optimizer.load_state_dict(_to_cpu(snap["optimizer"]))
        self.model.load_state_dict(snap["model"])
        if saved_outside is not None:
            with torch.no_grad():
                for i, p in outside:
                    local_tensor(p).copy_(saved_outside[i])
        # The scheduler goes back with the optimizer, so the learning rate and the schedule's
        # position stay consistent (a chainable scheduler computes the next lr from the current
        # one: restoring only the optimizer's lr would offset it for good).
        if snap["scheduler"] is not None and self.scheduler is not None:
            self.scheduler.load_state_dict(_to_cpu(snap["scheduler"]))
        rng = snap["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            # One state per GPU the saving process saw; a process that sees fewer (a resume on another
            # machine, CUDA_VISIBLE_DEVICES) restores those it has (set_rng_state_all would index past them).
            for i, state in enumerate(rng["cuda"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(state, i)
        random.setstate((random.getstate()[0], tuple(rng["python"]), rng.get("python_gauss_next")))
        if rng.get("numpy") is not None and "numpy" in sys.modules:
            _set_numpy_rng_state(rng["numpy"])
        if saved_scaler and scaler is not None:
            if self._in_step:
                # Inside step() the scaler is mid-step: its update() still has to run on this step's inf
                # check, and would move the restored scale. step() loads it after that update.
                self._scaler_to_restore = (scaler, saved_scaler)
            else:
                scaler.load_state_dict(saved_scaler)

    def _restore_or_put_back(self, snap: dict[str, Any]) -> None:
        """:meth:`_restore`, all or nothing: a snapshot or checkpoint that does not fit fails part-way (the
        optimizer loads, the model refuses a buffer registered since; or the other way round), so what
        was there is put back before the error is raised, and the caller's objects are unchanged."""
        before, pending = self._state(), self._scaler_to_restore
        try:
            self._restore(snap)
        except Exception:
            self._restore(before)
            self._scaler_to_restore = pending  # as it was: none, or an earlier rollback's in this step
            raise

    def _resume(self, resume: bool | str | os.PathLike[str]) -> None:
        if resume is True:
            if not self.policy.checkpoint_dir:
                raise ValueError(
                    "resume=True reads guard-last.pt from the policy's checkpoint_dir, which is None; "
                    "set GuardPolicy(checkpoint_dir=...) or pass resume=<path to the checkpoint>"
                )
            path = self.checkpoint_path()
            assert path is not None
        elif isinstance(resume, (str, os.PathLike)):
            path = Path(resume)
        else:
            raise TypeError(f"resume must be False, True or a path, got {type(resume).__name__} {resume!r}")
        if not path.is_file():
            raise FileNotFoundError(f"resume: no guard checkpoint at {path}; pass resume=False to start a new run")
        ckpt = load_checkpoint(path)
        missing = [k for k in ("model", "optimizer", "scheduler", "rng", "guard") if k not in ckpt]
        if missing:
            raise ValueError(
                f"resume: {path} is not a guard checkpoint (it lacks {missing}); pass the guard-last.pt that a "
                "Guard with checkpoint_dir wrote, or resume=False to start a new run"
            )
        self._check_total_rollbacks(ckpt["guard"], str(path))
        if ckpt.get("scaler") and self._snapshot_scaler() is None:
            warnings.warn(
                f"resume: {path} holds a GradScaler's state (scale {ckpt['scaler'].get('scale')}) but this guard "
                "has no enabled scaler: the run's scaler starts from its initial scale, and its first steps may "
                "overflow and be skipped. Pass it: Guard(..., scaler=scaler, resume=...)",
                stacklevel=3,
            )
        try:
            self._restore_or_put_back(ckpt)
        except Exception as e:
            raise ValueError(
                f"resume: {path} does not fit this model and optimizer ({type(e).__name__}: {e}); nothing was "
                "changed. Build them as in the run that wrote it, or pass resume=False to start a new run"
            ) from e
        saved = ckpt["guard"]
        self.step_count = int(saved["step"])
        self.load_counters(saved)
        self._scheduler_stepped = bool(saved.get("scheduler_stepped", False))

    def counters(self) -> dict[str, Any]:
        """What a resumed run needs of this guard's history, as plain numbers: its step, the losses the
        spike check compares with, the rollbacks (this run's and before), the lower_lr scale and the
        reference lag. In ``guard-last.pt``; the Trainer and Lightning callbacks keep it in their own
        checkpoints and give it back with :meth:`load_counters` when the framework resumes."""
        return {
            "step": self.step_count,
            "losses": list(self.losses),
            "rollbacks": self.rollbacks,
            "rollbacks_before_resume": self.rollbacks_before_resume,
            "lr_scale": self.lr_scale,
            "reference_lag": self.reference_lag,
        }

    def load_counters(self, saved: dict[str, Any], where: str = "the checkpoint") -> None:
        """Continue from :meth:`counters` of the run that wrote ``where`` (its step is not taken: the
        caller sets the step, from the checkpoint or from the framework's). Raises ``RuntimeError``
        where the rollbacks over every resumed run are beyond ``max_total_rollbacks``."""
        self._check_total_rollbacks(saved, where)
        self.losses = deque(saved["losses"], maxlen=self.policy.spike_window)
        # max_rollbacks is a budget per run: a run that max_rollbacks stopped is resumed after a person
        # looked (the runbook), and with the count restored its first rollback would stop it again.
        self.rollbacks_before_resume = int(saved["rollbacks"]) + int(saved.get("rollbacks_before_resume", 0))
        self.lr_scale = float(saved["lr_scale"])
        self.reference_lag = int(saved.get("reference_lag", 0))  # absent from checkpoints written before it
        # The Trainer and Lightning callbacks call this after the constructor took its first snapshot, at
        # this step, with fresh counters: a rollback to it would apply the restored lower_lr once more
        # (lr_scale / the snapshot's) and take its reference lag from 0, and a crash before the next
        # snapshot would resume from a file without the earlier runs' rollbacks. A snapshot of this step
        # holds this step's counters.
        newest = self._snapshots[-1] if self._snapshots else None
        for snap in self._snapshots:
            if snap["guard"]["step"] == self.step_count:
                snap["guard"].update(self.counters())
        if newest is not None and newest["guard"]["step"] == self.step_count:
            self._write_checkpoint(newest)

    def _check_total_rollbacks(self, saved: dict[str, Any], where: str) -> None:
        total = int(saved["rollbacks"]) + int(saved.get("rollbacks_before_resume", 0))
        cap = self.policy.max_total_rollbacks
        if cap is not None and total > cap:
            # A job that restarts by itself must stop for good here, not train on until its next rollback.
            raise RuntimeError(
                f"resume: the runs that wrote {where} rolled back {total} times (max_total_rollbacks={cap}); "
                "the run keeps degrading across restarts: inspect the event log, then raise the cap or start over"
            )

    def rollback(self) -> int:
        """Restore the last good snapshot in place; return the step it was taken at."""
        # A second rollback before any new snapshot means the newest one was already damaged
        # (a too-high learning rate degrades the weights for a while before the loss spikes):
        # drop it and go one further back.
        older = self._rolled_back_since_snapshot and len(self._snapshots) > 1
        snap = self._snapshots[-2 if older else -1]
        try:
            self._restore_or_put_back(snap)
        except Exception as e:
            raise RuntimeError(
                f"rollback: the snapshot of step {snap['guard']['step']} does not fit the model and optimizer any more "
                f"({type(e).__name__}: {e}); nothing was changed. A param group added or a parameter resized "
                "after the snapshot does this: take a new snapshot after such a change (guard.take_snapshot())"
            ) from e
        if older:
            self._snapshots.pop()
        self._rolled_back_since_snapshot = True
        self._keep_lr_scale(snap)
        self.losses = deque(snap["guard"]["losses"], maxlen=self.policy.spike_window)
        self.spike_run = 0
        self.reference_lag = self._lag_of(snap)
        self.behind_run = 0  # misses counted against the state rolled away from
        self._healthy_since_snapshot = 0  # the restored state earns a new snapshot only by healthy steps
        self._held_schedule = None
        self._scheduler_stepped = bool(snap["guard"].get("scheduler_stepped", False))
        if self._scheduler_stepped and self.scheduler is not None and self.restores_schedule:
            self.hold_schedule()
        self.rollbacks += 1
        where = f" at {self.policy.log_path}" if self.policy.log_path else ""
        total, cap = self.rollbacks_before_resume + self.rollbacks, self.policy.max_total_rollbacks
        if self.rollbacks > self.policy.max_rollbacks or (cap is not None and total > cap):
            # The restored state is good and the count must survive the stop: a job that restarts by
            # itself resumes from this file, and the cap over every resume counts this rollback too.
            self._write_checkpoint(self._state())
        if self.rollbacks > self.policy.max_rollbacks:
            raise RuntimeError(
                f"the guard rolled back {self.rollbacks} times (max_rollbacks={self.policy.max_rollbacks}); "
                f"the run keeps degrading: inspect the event log{where}"
            )
        if cap is not None and total > cap:
            raise RuntimeError(
                f"the guard rolled back {total} times over this run and the runs it resumed "
                f"(max_total_rollbacks={cap}); the run keeps degrading across restarts: inspect the event log{where}"
            )
        return snap["guard"]["step"]

    def _keep_lr_scale(self, snap: dict[str, Any]) -> None:
        """After restoring ``snap``: the lower_lr decisions taken since it stay in force (else each
        rollback would undo them and halving again would never compound)."""
        rescale = self.lr_scale / snap["guard"]["lr_scale"]
        if rescale != 1.0:
            _scale_lr(self.optimizer, self.scheduler, rescale)

    def _lag_of(self, snap: dict[str, Any]) -> int:
        """``reference_lag`` with ``snap``'s weights now: they were trained for the snapshot's steps less
        its own lag, and the step being judged (not taken) is the step_count-th."""
        return self.step_count - (snap["guard"]["step"] - snap["guard"].get("reference_lag", 0))

    def hold_schedule(self) -> None:
        """Remember the schedule as restored, to be put back by :meth:`settle_schedule`.

        A rollback happens inside a step, and the loop steps the scheduler after it (a plain loop,
        Trainer). After a rollback to a snapshot taken inside a step that is what the schedule needs.
        The constructor's snapshot was taken with the scheduler already stepped for the step about to
        run, so the loop's step would put the rest of the run one step ahead. Put back, the schedule
        runs as if the undone steps had not been. The Lightning callback, whose snapshots are all taken
        after the scheduler's step, calls this itself after a rollback in ``before_step``.

        Every key of each param group but ``params`` is held, not the learning rates only: a scheduler
        may write others (OneCycleLR and CyclicLR cycle ``momentum`` or ``betas``; with the lrs alone the
        first step after a rollback took its momentum one step ahead).
        """
        groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self._held_schedule = (_to_cpu(self.scheduler.state_dict()), groups)

    def settle_schedule(self) -> None:
        """Put back the schedule a rollback restored, if the loop has stepped the scheduler since (see
        :meth:`hold_schedule`). ``before_step`` does it; a loop that saves its own checkpoints between
        the scheduler's step and the next ``before_step`` (Trainer) calls it first."""
        held, self._held_schedule = self._held_schedule, None
        if held is None or self.scheduler is None:
            return
        state, groups = held
        self.scheduler.load_state_dict(state)
        for group, saved in zip(self.optimizer.param_groups, groups):
            for key, value in saved.items():
                if isinstance(group.get(key), torch.Tensor) and isinstance(value, torch.Tensor):
                    group[key].copy_(value)  # a tensor lr keeps its identity (capturable, fused)
                else:
                    group[key] = value

    # ------------------------------------------------------------ actions

    def _log(self, event: GuardEvent) -> None:
        self.events.append(event)
        # Every rank takes the same decisions on the same values: rank 0 writes the one log.
        if self.policy.log_path and (not self._distributed() or torch.distributed.get_rank() == 0):
            row = asdict(event) | {"time": time.time()}
            # Its folder made here, as checkpoint_dir's is: a missing one must not stop training at the
            # first event (a NaN that would only have been skipped).
            Path(self.policy.log_path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.policy.log_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def _act(self, event: str, seen: dict[str, Any], actions: tuple[str, ...], skips: bool = False) -> GuardEvent:
        """Take ``actions``; ``skips``: the step being judged will not be taken (before_step's events)."""
        result: dict[str, Any] = {}
        if skips and "rollback" not in actions and tuple(actions) != ("none",):
            # The weights fall one more step behind the step count, as reference_curve is read (a
            # rollback sets the lag itself). Counted first: a checkpoint written below holds it.
            self.reference_lag += 1
        try:
            for i, action in enumerate(actions):
                if action == "rollback":
                    result["rolled_back_to_step"] = self.rollback()
                elif action == "lower_lr":
                    self.lr_scale *= self.policy.lr_factor
                    unknown = _scale_lr(self.optimizer, self.scheduler, self.policy.lr_factor)
                    result["lr"] = [float(g["lr"]) for g in self.optimizer.param_groups]
                    if unknown:
                        result["scheduler_unknown"] = unknown  # only its base_lrs were scaled
                elif action in ("raise_density", "raise_window"):
                    result.update(self._relax(action, actions[i + 1 :]))
                elif action == "fallback_adamw":
                    result.update(self._fallback())
                elif action == "raise":
                    raise RuntimeError(
                        f"guard: {event} at step {self.step_count}: {seen} (the policy's 'raise' action)"
                        + (f"; event log at {self.policy.log_path}" if self.policy.log_path else "")
                    )
            if self._held_schedule is not None:
                self.hold_schedule()  # as the later actions left it (lower_lr after the rollback)
        except Exception as e:
            # The event that stops the run is the one a person most needs to find in the log.
            result["raised"] = f"{type(e).__name__}: {e}"
            self._log(GuardEvent(self.step_count, event, seen, list(actions), result))
            raise
        ev = GuardEvent(self.step_count, event, seen, list(actions), result)
        # (While a spike awaits confirmation the weights are not known good: the file keeps the last
        # state that was; a rollback resets spike_run, so its restored state is written.)
        rewrite = bool(self._CHANGES_STATE.intersection(actions)) and self.spike_run == 0
        if rewrite and event == "loss_spike" and "rollback" not in actions and self.policy.checkpoint_dir:
            # A confirmed spike means damaged weights; a policy that goes on from them (lower_lr only)
            # must not put them on disk, where the runbook resumes from. Building that state loads the
            # last snapshot for a moment: if it no longer fits (a param group added since) or a
            # conversion runs out of memory, the file keeps the earlier good state and the run goes on.
            try:
                state = self._last_good_with_current_settings()
            except Exception as e:
                rewrite = False
                result["checkpoint"] = (
                    f"not rewritten ({type(e).__name__}: {e}): it keeps an earlier good state, without this "
                    "event's settings"
                )
                warnings.warn(
                    f"Guard: {event} at step {self.step_count}: guard-last.pt {result['checkpoint']}", stacklevel=3
                )
        else:
            state = None
        # The checkpoint before the log line: after a rollback one snapshot further back, the file holds
        # the newest snapshot, just judged damaged, until it is rewritten; a crash while the log is
        # written must not leave it there for the resume.
        if rewrite:
            self._write_checkpoint(self._state() if state is None else state)
        self._log(ev)
        return ev

    def _last_good_with_current_settings(self) -> dict[str, Any]:
        """The last snapshot with the lr scale, density, window and fallbacks in force now: what a resume
        should start from after an event that changed the settings but kept damaged weights."""
        snap = self._snapshots[-1]
        settings = [{k: g[k] for k in ("density", "window", "dense") if k in g} for g in self.optimizer.param_groups]
        here, pending = self._state(), self._scaler_to_restore
        try:
            self._restore(snap)
            self._keep_lr_scale(snap)
            opt = self._microadam()
            for i, (group, now) in enumerate(zip(opt.param_groups if opt else [], settings)):
                if group.get("dense", False):
                    continue
                if now.get("dense", False):
                    opt.fallback_to_adamw(groups=[i])
                    continue
                changes = {k: now[k] for k in ("density", "window") if k in now and now[k] != group[k]}
                if changes:
                    opt.reconfigure(**changes, groups=[i])
            state = self._state()
        finally:
            self._restore(here)  # the run itself goes on from where it is, as its policy says
            # Inside step() those restores only queued scaler states: the step's own update() must still
            # move the live scaler (or an earlier rollback's state be loaded after it).
            self._scaler_to_restore = pending
        state["guard"] |= {
            "losses": list(snap["guard"]["losses"]),
            "reference_lag": self._lag_of(snap),
            "scheduler_stepped": bool(snap["guard"].get("scheduler_stepped", False)),  # the snapshot's schedule
        }
        return state

    def _microadam(self) -> Any:
        """The MicroAdam under ``self.optimizer``, through wrappers that keep it as ``.optimizer``
        (accelerate's ``AcceleratedOptimizer``, Lightning's), or None."""
        from microadam.optimizer import MicroAdam

        opt = self.optimizer
        for _ in range(4):  # wrappers of wrappers, but never a loop
            if isinstance(opt, MicroAdam):
                return opt
            opt = getattr(opt, "optimizer", None)
            if opt is None:
                break
        return None

    def _relax(self, action: str, next_actions: tuple[str, ...] = ()) -> dict[str, Any]:
        """Raise each compressed group's density (or window) from its own value, up to the cap.

        When every group is already at the cap, compression cannot be relaxed further: the
        groups fall back to dense AdamW (logged), unless a later action of the acting event's
        own list (``next_actions``) is that.
        """
        from microadam.memory import state_bytes

        opt = self._microadam()
        if opt is None:
            return {"skipped": "not a MicroAdam optimizer"}
        live = [i for i, g in enumerate(opt.param_groups) if not g.get("dense", False)]
        if not live:
            return {"skipped": "every group already runs dense AdamW"}
        changed: dict[str, Any] = {}
        for i in live:
            g = opt.param_groups[i]
            if action == "raise_density":
                cap = self.policy.auto_density[1] if self.policy.auto_density else self.policy.max_density
                new = min(cap, g["density"] * self.policy.density_factor)
                if new > g["density"]:
                    opt.reconfigure(density=new, groups=[i])
                    changed[f"group{i}_density"] = new
            else:
                new_w = min(self.policy.max_window, g["window"] + self.policy.window_step)
                if new_w > g["window"]:
                    opt.reconfigure(window=new_w, groups=[i])
                    changed[f"group{i}_window"] = new_w
        if not changed:
            if "fallback_adamw" in next_actions:
                return {"note": "at the cap; the next action falls back"}
            return {"at_cap": True, **self._fallback()}
        return {**changed, "state_bytes": state_bytes(opt)}

    def _fallback(self) -> dict[str, Any]:
        from microadam.memory import state_bytes

        opt = self._microadam()
        if opt is None:
            return {"skipped": "not a MicroAdam optimizer"}
        opt.fallback_to_adamw()
        return {"fallback": "dense AdamW", "state_bytes": state_bytes(opt)}

    # ------------------------------------------------------------ the step

    def _out_of_range_gradient(self) -> str | None:
        """None if every gradient, on every rank, is finite and within GRAD_LIMIT (beyond it MicroAdam's
        step would overflow, so the Guard treats such a gradient as non-finite, for any optimizer);
        otherwise what the event log should say: the first parameter, by its name in the model, whose
        gradient is not, and its first bad value (or that it is on another rank)."""
        from microadam.optimizer import first_out_of_range, grads_in_range

        every = [p for g in self.optimizer.param_groups for p in g["params"]]
        params = [p for p in every if p.grad is not None]
        grads = [_values_of(local_tensor(p.grad)) for p in params]
        here = grads_in_range(grads)
        if self._all_ranks(here, all_of=True):
            return None
        found = None if here else first_out_of_range(grads)
        if found is None:
            return "out of range on another rank"
        i, value = found
        # A parameter the optimizer holds outside the model: its index among all of the optimizer's.
        fallback = f"optimizer parameter {next(j for j, q in enumerate(every) if q is params[i])}"
        name = next((n for n, q in self.model.named_parameters() if q is params[i]), fallback)
        return f"{name} holds {value:.3g}" if math.isfinite(value) else f"{name} holds {value}"

    @staticmethod
    def _distributed() -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    def _all_ranks(self, flag: bool, all_of: bool) -> bool:
        """Agree across ranks (DDP/FSDP): every rank must take the same decision."""
        if not self._distributed():
            return flag
        t = self._collective_tensor([1.0 if flag else 0.0])
        op = torch.distributed.ReduceOp.MIN if all_of else torch.distributed.ReduceOp.MAX
        torch.distributed.all_reduce(t, op=op)
        return bool(t.item() > 0.5)

    @staticmethod
    def _collective_tensor(values: list[float]) -> torch.Tensor:
        from microadam.optimizer import _collective_device

        return torch.tensor(values, dtype=torch.float64, device=_collective_device(torch.device("cpu")))

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        if not self._distributed():
            return values
        t = self._collective_tensor(values)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def _mean_over_ranks(self, value: float) -> float:
        """The loss every rank judges: the mean over ranks (a local loss would let ranks disagree)."""
        if not self._distributed():
            return value
        return self._sum_over_ranks([value])[0] / torch.distributed.get_world_size()

    def _reference_at(self, step: int) -> float | None:
        curve = self.policy.reference_curve
        if not curve:
            return None
        pts = sorted(curve)
        if step <= pts[0][0]:
            return pts[0][1]
        for (s0, l0), (s1, l1) in zip(pts, pts[1:]):
            if s0 <= step <= s1:
                return l0 + (l1 - l0) * (step - s0) / max(1, s1 - s0)
        return None  # past the reference's end: nothing to compare with

    def step(self, loss: torch.Tensor | float, scaler: Any = None) -> GuardEvent | None:
        """Check this step's loss and gradients, then step the optimizer or act. Returns the event, if any.

        With a ``torch.amp.GradScaler`` (after ``scaler.scale(loss).backward()``), pass it as
        ``scaler`` (or give it to the constructor, which also puts its state in the checkpoint from the
        first snapshot on): the guard unscales the gradients (unless ``scaler.unscale_`` ran already this
        step, say to clip them), checks them, steps through ``scaler.step(optimizer)`` and calls
        ``scaler.update()``, on a skipped step too. After a rollback the scaler holds the snapshot's state.

        With accelerate, give the guard the optimizer ``accelerator.prepare`` returned and call this
        where the loop would call ``optimizer.step()``: under ``fp16`` the guard uses the scaler that
        wrapper holds (``scaler`` may be omitted) and lets the wrapper step and update it; under
        gradient accumulation (``accelerator.accumulate``) a micro-batch that does not sync only
        records its loss, and the step that syncs is judged on the mean of the window's losses, so
        ``patience``, ``snapshot_every`` and ``reference_curve`` count optimizer steps.
        """
        # First, before anything is recorded: a refused call must change nothing (a retry would count an
        # accumulation window's loss twice).
        if scaler is None:
            scaler = self.scaler
        elif self.scaler is None:
            if _enabled(scaler):
                self.scaler = scaler  # from now on its state is in the snapshots
        elif scaler is not self.scaler:
            raise ValueError(
                "guard.step: scaler is not the GradScaler the guard was given (Guard(..., scaler=...)); pass that "
                "one, or none to use it"
            )
        # accelerate's gradient accumulation: its wrapper's step() does nothing until the window's last
        # micro-batch, whose gradients hold the whole window's (a NaN in one stays until then).
        state = getattr(self.optimizer, "gradient_state", None)
        if state is not None and not getattr(state, "sync_gradients", True):
            self._micro_losses.append(_loss_value(loss))
            return None
        if self._micro_losses:
            window, self._micro_losses = [*self._micro_losses, _loss_value(loss)], []
            loss = math.fsum(window) / len(window)
        # accelerate's AcceleratedOptimizer under fp16 holds the GradScaler, and its step() runs
        # scaler.step and scaler.update itself: the guard unscales its inner optimizer's gradients
        # (the one scaler.step is keyed by) and, on a step it takes, leaves the rest to the wrapper.
        held = getattr(self.optimizer, "scaler", None)
        wrapper_steps = held is not None and hasattr(self.optimizer, "optimizer") and scaler in (None, held)
        if wrapper_steps:
            scaler = held
        inner = self.optimizer.optimizer if wrapper_steps else self.optimizer
        # The guard must judge the true gradients, and scaler.update() needs the inf check that
        # unscale_ records: on a step the guard skips, scaler.step() never runs and update() raises
        # "No inf checks were recorded prior to update" without it.
        scale = unscaled_grad_scale(scaler, inner)
        updated = False
        self._in_step, self._scaler_to_restore = True, None
        try:
            go, event = self.before_step(loss, grad_scale=scale)
            if go:
                if wrapper_steps:
                    self.optimizer.step()
                    updated = True
                elif scaler is not None:
                    scaler.step(self.optimizer)
                    # Before after_step: a snapshot it takes holds the scale the next step runs at.
                    scaler.update()
                    updated = True
                else:
                    self.optimizer.step()
                event = self.after_step() or event
            elif (
                wrapper_steps
                and event is not None
                and event.event == "overflow"
                and hasattr(self.optimizer, "_is_overflow")
            ):
                # What the wrapper's step records when its scaler skips a step: accelerate's scheduler
                # wrapper then holds the schedule, as it does without the guard.
                self.optimizer._is_overflow = True
        finally:
            # Also when the guard raises: a caller that catches it and goes on must find the scaler
            # ready for the next step, not mid-step ("unscale_() has already been called").
            try:
                if scaler is not None and not updated:
                    scaler.update()
            finally:
                self._in_step = False
                restore, self._scaler_to_restore = self._scaler_to_restore, None
                if restore is not None:
                    restore[0].load_state_dict(restore[1])  # a rollback's: the snapshot's scale, not this step's
        return event

    def before_step(
        self, loss: torch.Tensor | float | None, *, grad_scale: float | None = None
    ) -> tuple[bool, GuardEvent | None]:
        """Checks before ``optimizer.step()``: ``(True, None)`` to go ahead (``(True, event)`` when an event
        was only logged, e.g. a first spike), ``(False, event)`` if the guard acted.

        For loops that call ``optimizer.step()`` themselves (Trainer, Lightning): call this first,
        step only if it says so, then call :meth:`after_step`. ``loss`` may be ``None`` when the
        loop does not expose it; then only gradients are checked. Under gradient accumulation call it
        once per optimizer step, on the micro-batch that steps (:meth:`step` does that by itself
        under accelerate).

        ``grad_scale``: a ``GradScaler``'s scale this step (:meth:`step` passes it), after
        ``scaler.unscale_``. With a finite loss (or none given: the Lightning callback, which sees the
        loss only after the step), a gradient out of range at a scale above 1 is an fp16 overflow,
        which the scaler handles by skipping the step and lowering the scale (a run's first steps at
        the default 65536 often overflow): the guard skips it too and logs an ``overflow`` event, but
        does not count it towards ``patience``, so it never rolls back for it. The scale halves at
        each, so a model whose own gradients are non-finite is acted on once it is down to 1.
        """
        if self.scaler is not None and not self._in_step:
            # The loop steps and updates the scaler itself, after this: a rollback here could not restore the
            # scaler's state after that update (which would move it), nor a snapshot in after_step hold it.
            raise ValueError(
                "guard.before_step: this guard was given a GradScaler (Guard(..., scaler=...) or guard.step(loss, "
                "scaler=...)), so let guard.step(loss) drive it: it unscales (unless the loop did, to clip), steps "
                "and updates in the order a rollback needs. A loop that calls before_step itself keeps its scaler: "
                "build the guard without scaler= and save scaler.state_dict() in its own checkpoints"
            )
        # The loss first: a loss that is not one number raises before anything is counted or changed.
        value = float("nan") if loss is None else _loss_value(loss)
        self.settle_schedule()
        self._scheduler_stepped = False  # from here to the loop's scheduler.step(), it is not
        self.step_count += 1
        p = self.policy
        if loss is not None:
            value = self._mean_over_ranks(value)
        finite_loss = loss is None or math.isfinite(value)
        self._pending_loss = value if loss is not None else None
        self._pending_drift = None

        # The loss is the ranks' mean, so every rank skips the gradients' collective check together.
        bad_gradient = self._out_of_range_gradient() if finite_loss else None
        if bad_gradient is not None and grad_scale is not None and grad_scale > 1.0:
            seen = {"loss": None if loss is None else value, "gradient": bad_gradient, "grad_scale": grad_scale}
            repaired = self._repair_buffers()
            if repaired:
                seen["buffers_restored"] = repaired
            return False, self._act("overflow", seen, ("skip",), skips=True)
        if not finite_loss or bad_gradient is not None:
            self.nonfinite_run += 1
            seen = {
                "loss": None if loss is None else (value if finite_loss else str(value)),
                "consecutive": self.nonfinite_run,
            }
            if bad_gradient is not None:
                seen["gradient"] = bad_gradient
            repaired = self._repair_buffers()
            if repaired:
                seen["buffers_restored"] = repaired
            actions = p.on_nonfinite if self.nonfinite_run < p.patience else ("rollback",)
            if self.nonfinite_run >= p.patience:
                self.nonfinite_run = 0
            return False, self._act("nonfinite", seen, actions, skips=True)
        self.nonfinite_run = 0

        observed = None  # an event that only logged (action "none"): returned with the go-ahead
        if loss is not None:
            event = self._loss_checks(value, skips=True)
            if event is not None and tuple(event.actions) != ("none",):
                return False, event
            observed = event

        opt = self._microadam()
        if opt is not None and p.max_error_ratio is not None and self.step_count % p.error_check_every == 0:
            grads = [q.grad for g in opt.param_groups for q in g["params"] if q.grad is not None]
            # This rank's parts of both norms (error_feedback_norm is the local shard's), summed over
            # the ranks: under FSDP2 that is the whole model's, and under DDP, where every rank holds
            # everything, both sums grow by the world size alike. Every rank gets the same ratio and
            # takes the same decision (a density changed on one rank only would change its state's
            # shapes and mismatch the next collective).
            gsq = sum(float(local_tensor(g).double().square().sum()) for g in grads)
            esq = opt.error_feedback_norm()[0] ** 2
            esq, gsq = self._sum_over_ranks([esq, gsq])
            ratio = math.sqrt(esq / gsq) if gsq > 0 else 0.0
            if ratio > p.max_error_ratio:
                self._pending_drift = {"error_ratio": ratio, "max_error_ratio": p.max_error_ratio}
            elif p.auto_density and p.min_error_ratio is not None and ratio < p.min_error_ratio:
                from microadam.memory import state_bytes

                lowered = {}
                for i, g in enumerate(opt.param_groups):
                    new = max(p.auto_density[0], g["density"] / p.density_factor)
                    if not g.get("dense", False) and new < g["density"]:
                        opt.reconfigure(density=new, groups=[i])
                        lowered[f"group{i}_density"] = new
                if lowered:
                    result = {**lowered, "state_bytes": state_bytes(opt)}
                    self._log(
                        GuardEvent(self.step_count, "low_error", {"error_ratio": ratio}, ["lower_density"], result)
                    )
        return True, observed

    def _repair_buffers(self) -> list[str]:
        """Put back, from the last snapshot, each floating buffer of the model that holds NaN or Inf now
        but did not there; return their names.

        For a step about to be skipped for a non-finite loss or gradient: its forward pass has already
        run, and a NaN input has written NaN into BatchNorm's running statistics. The training losses
        that follow use batch statistics and stay finite, so nothing else would ever notice, and every
        later snapshot and guard-last.pt would hold them (evaluation output all NaN). The snapshot's
        values are at most ``snapshot_every`` healthy steps old: for running averages, a few updates
        fewer. A buffer that was not finite in the snapshot either (an attention mask of -inf) is left
        as it is.
        """
        if not self._snapshots:
            return []
        saved = self._snapshots[-1]["model"]
        repaired = []
        for name, buf in self.model.named_buffers():
            if not buf.is_floating_point() or name not in saved or bool(buf.isfinite().all()):
                continue
            good = saved[name]
            if good.shape == buf.shape and bool(good.isfinite().all()):
                buf.copy_(good)
                repaired.append(name)
        return repaired

    def _loss_checks(self, value: float, skips: bool = False) -> GuardEvent | None:
        """Spike and reference-curve checks of one finite loss; acts and returns the event if one fires.
        ``skips``: an event that acts keeps this step from being taken (before_step; not observe_loss)."""
        p = self.policy
        if len(self.losses) >= min(p.warmup, p.spike_window) and self.step_count > p.warmup:
            med = statistics.median(self.losses)
            # Three conditions, each measured necessary on the digits demo: a factor over the
            # median, an absolute floor (near convergence 0.05 against 0.01 is noise), and a new
            # high for the window (per-batch noise of a converging run repeats its own highs).
            if value > p.spike_factor * med and value - med > p.spike_min_delta and value > max(self.losses):
                self.spike_run += 1
                seen = {"loss": value, "running_median": med, "consecutive": self.spike_run}
                if self.spike_run < p.spike_patience:
                    # Not yet: one outlier batch is not a degraded run, and its step goes ahead (a
                    # hard batch is data, not a fault). Its loss stays out of the history, so the
                    # next batch is judged against the same healthy median.
                    self._pending_loss = None
                    return self._act("loss_spike", seen, ("none",))
                self.spike_run = 0
                return self._act("loss_spike", seen, p.on_spike, skips=skips)
        self.spike_run = 0
        ref_step = self.step_count - self.reference_lag
        ref = self._reference_at(ref_step)
        if ref is not None and len(self.losses) >= p.spike_window:
            mean = statistics.fmean(self.losses)
            if mean > ref * (1 + p.reference_margin):
                self.behind_run += 1
                if self.behind_run >= p.patience:
                    self.behind_run = 0
                    seen = {"mean_loss": mean, "reference_loss": ref, "reference_step": ref_step,
                            "margin": p.reference_margin}  # fmt: skip
                    return self._act("behind_reference", seen, p.on_behind_reference, skips=skips)
            else:
                self.behind_run = 0
        return None

    def observe_loss(self, loss: torch.Tensor | float) -> GuardEvent | None:
        """For loops that expose the loss only after the step (Lightning): check it, then do
        :meth:`after_step`'s bookkeeping. A spike rolls back the step that was just taken too."""
        value = self._mean_over_ranks(_loss_value(loss))
        if not math.isfinite(value):
            # The step was already taken (its gradients were finite), so skipping is no longer
            # possible: roll back to before it.
            return self._act("nonfinite", {"loss": str(value)}, ("rollback",))
        self._pending_loss = value
        event = self._loss_checks(value)
        if event is not None and tuple(event.actions) != ("none",):
            return event
        return self.after_step() or event

    def after_step(self) -> GuardEvent | None:
        """Bookkeeping after a healthy ``optimizer.step()``: history, drift actions, snapshots."""
        if self._pending_loss is not None:
            self.losses.append(self._pending_loss)
        if self.spike_run == 0:
            # A step taken after a spike not yet confirmed is not known to be healthy: no snapshot
            # may hold its weights (the next loss tells).
            self._healthy_since_snapshot += 1
        event = None
        drift, self._pending_drift, self._pending_loss = self._pending_drift, None, None
        if drift is not None:
            event = self._act("error_drift", drift, self.policy.on_error_drift)
        elif self.spike_run == 0 and self._healthy_since_snapshot >= self.policy.snapshot_every:
            # spike_run too: the count may have reached snapshot_every on a step that acted on drift
            # instead, and this step may be a first spike, whose weights no snapshot may hold.
            self.take_snapshot()
        return event
