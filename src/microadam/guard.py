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
the running median)
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
the previous checkpoint intact. Every event is one JSONL line.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["Guard", "GuardPolicy", "GuardEvent", "save_atomic", "load_checkpoint"]

ACTIONS = {"skip", "rollback", "lower_lr", "raise_density", "raise_window", "fallback_adamw", "raise", "none"}


@dataclass
class GuardPolicy:
    """What the guard watches and what it does.

    Attributes:
        snapshot_every: healthy steps between snapshots of the last good state.
        checkpoint_dir: also write each snapshot there atomically (``guard-last.pt``).
        patience: consecutive non-finite steps (or reference-curve misses) before escalating.
        spike_factor, spike_min_delta, spike_window, warmup: a loss above ``spike_factor`` times
            the median of the last ``spike_window`` losses, and above it by at least
            ``spike_min_delta`` (loss units), is a spike; not checked in the first ``warmup`` steps.
            and above every loss in that window. The absolute floor and the new-high rule matter
            near convergence, where per-batch noise is several times the median (measured: without
            them the digits demo in ``examples/guard_demo.py`` rolled back on noise after its loss
            fell below 0.1).
        max_error_ratio: error-feedback norm over gradient norm that counts as drift (None: off).
        error_check_every: steps between error-feedback checks (each costs one pass over the codes).
        auto_density: ``(min, max)`` to adapt density from the measured error ratio: raised by
            ``density_factor`` above ``max_error_ratio``, lowered below ``min_error_ratio``.
        reference_curve: ``[(step, loss), ...]`` of a baseline run (e.g. a ``microadam compare``
            record's ``loss_curve``); the mean of the last ``spike_window`` losses may exceed the
            reference's by at most ``reference_margin`` (relative).
        on_nonfinite, on_spike, on_error_drift, on_behind_reference: the actions, in order.
        lr_factor: ``lower_lr`` multiplies every group's lr (and a scheduler's base lrs) by it.
        density_factor, max_density, window_step, max_window: how far compression may be relaxed.
        keep_snapshots: snapshots kept; repeated rollbacks with no new snapshot in between go
            one snapshot further back each time.
        max_rollbacks: more rollbacks than this raises ``RuntimeError`` (a run that keeps failing
            needs a person).
        log_path: the JSONL event log.
    """

    snapshot_every: int = 100
    checkpoint_dir: str | None = None
    patience: int = 3
    spike_factor: float = 3.0
    spike_min_delta: float = 0.1
    spike_window: int = 20
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
    keep_snapshots: int = 3
    log_path: str | None = None

    def __post_init__(self) -> None:
        for name in ("on_nonfinite", "on_spike", "on_error_drift", "on_behind_reference"):
            actions = tuple(getattr(self, name))
            bad = [a for a in actions if a not in ACTIONS]
            if bad:
                raise ValueError(f"{name}: unknown action {bad[0]!r}; choose from {sorted(ACTIONS)}")
            setattr(self, name, actions)
        for name in (
            "snapshot_every",
            "patience",
            "spike_window",
            "error_check_every",
            "max_rollbacks",
            "keep_snapshots",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr_factor < 1:
            raise ValueError(f"lr_factor must be in (0, 1), got {self.lr_factor}")
        if self.spike_factor <= 1:
            raise ValueError(f"spike_factor must be > 1, got {self.spike_factor}")
        if self.auto_density is not None:
            lo, hi = self.auto_density
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"auto_density must be (min, max) with 0 < min <= max <= 1, got {self.auto_density}")
            if self.max_error_ratio is None:
                raise ValueError("auto_density needs max_error_ratio (and optionally min_error_ratio) to steer by")


@dataclass
class GuardEvent:
    step: int
    event: str
    seen: dict[str, Any]
    actions: list[str]
    result: dict[str, Any] = field(default_factory=dict)


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` that never leaves a half-written file at ``path``: temp file, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a guard checkpoint with ``weights_only=True``."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


class Guard:
    """Watch a training run through its loss and its optimizer; act on degradation.

    Args:
        model: the module being trained.
        optimizer: any torch optimizer; compression actions need :class:`~microadam.MicroAdam`.
        policy: a :class:`GuardPolicy` (default: skip non-finite steps, roll back on spikes).
        scheduler: an LR scheduler whose base lrs ``lower_lr`` should scale too.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        policy: GuardPolicy | None = None,
        scheduler: Any = None,
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.policy = policy or GuardPolicy()
        self.step_count = 0
        self.losses: deque[float] = deque(maxlen=self.policy.spike_window)
        self.nonfinite_run = 0
        self.behind_run = 0
        self.rollbacks = 0
        self.lr_scale = 1.0  # product of every lower_lr so far
        self.events: list[GuardEvent] = []
        self._snapshots: deque[dict[str, Any]] = deque(maxlen=self.policy.keep_snapshots)
        self._rolled_back_since_snapshot = False
        self._healthy_since_snapshot = 0
        self._pending_loss: float | None = None
        self._pending_drift: dict[str, Any] | None = None
        self.take_snapshot()

    # ------------------------------------------------------------ snapshots

    def _state(self) -> dict[str, Any]:
        return {
            "model": _to_cpu(self.model.state_dict()),
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": list(random.getstate()[1]),
            },
            "scheduler": _to_cpu(self.scheduler.state_dict()) if self.scheduler is not None else None,
            "guard": {
                "step": self.step_count,
                "losses": list(self.losses),
                "rollbacks": self.rollbacks,
                "lr_scale": self.lr_scale,
            },
        }

    def take_snapshot(self) -> None:
        """Remember the current state as the last good one (and write it to disk if configured)."""
        snap = self._state()
        self._snapshots.append(snap)
        self._healthy_since_snapshot = 0
        self._rolled_back_since_snapshot = False
        if self.policy.checkpoint_dir:
            save_atomic(snap, Path(self.policy.checkpoint_dir) / "guard-last.pt")

    def rollback(self) -> int:
        """Restore the last good snapshot in place; return the step it was taken at."""
        # A second rollback before any new snapshot means the newest one was already damaged
        # (a too-high learning rate degrades the weights for a while before the loss spikes):
        # drop it and go one further back.
        if self._rolled_back_since_snapshot and len(self._snapshots) > 1:
            self._snapshots.pop()
        snap = self._snapshots[-1]
        self._rolled_back_since_snapshot = True
        self.model.load_state_dict(snap["model"])
        # The snapshot may predate a change of density, window or a fallback: restore the
        # configuration it was taken under before its state (load_state_dict checks they agree).
        for group, saved in zip(self.optimizer.param_groups, snap["optimizer"]["param_groups"]):
            for key in ("density", "window", "dense"):
                if key in saved:
                    group[key] = saved[key]
        self.optimizer.load_state_dict(_to_cpu(snap["optimizer"]))
        # The scheduler goes back with the optimizer, so the learning rate and the schedule's
        # position stay consistent (a chainable scheduler computes the next lr from the current
        # one: restoring only the optimizer's lr would offset it for good).
        if snap["scheduler"] is not None:
            self.scheduler.load_state_dict(snap["scheduler"])
        # lower_lr decisions taken since the snapshot stay in force (else each rollback would
        # undo them and halving again would never compound).
        rescale = self.lr_scale / snap["guard"]["lr_scale"]
        if rescale != 1.0:
            for g in self.optimizer.param_groups:
                g["lr"] = g["lr"] * rescale
            if self.scheduler is not None and hasattr(self.scheduler, "base_lrs"):
                self.scheduler.base_lrs = [lr * rescale for lr in self.scheduler.base_lrs]
        torch.set_rng_state(snap["rng"]["torch"])
        if snap["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(snap["rng"]["cuda"])
        state = random.getstate()
        random.setstate((state[0], tuple(snap["rng"]["python"]), state[2]))
        self.losses = deque(snap["guard"]["losses"], maxlen=self.policy.spike_window)
        self._healthy_since_snapshot = 0  # the restored state earns a new snapshot only by healthy steps
        self.rollbacks += 1
        if self.rollbacks > self.policy.max_rollbacks:
            raise RuntimeError(
                f"the guard rolled back {self.rollbacks} times (max_rollbacks={self.policy.max_rollbacks}); "
                "the run keeps degrading: inspect the event log"
                + (f" at {self.policy.log_path}" if self.policy.log_path else "")
            )
        return snap["guard"]["step"]

    # ------------------------------------------------------------ actions

    def _log(self, event: GuardEvent) -> None:
        self.events.append(event)
        if self.policy.log_path:
            row = asdict(event) | {"time": time.time()}
            with open(self.policy.log_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def _act(self, event: str, seen: dict[str, Any], actions: tuple[str, ...]) -> GuardEvent:
        result: dict[str, Any] = {}
        for action in actions:
            if action == "rollback":
                result["rolled_back_to_step"] = self.rollback()
            elif action == "lower_lr":
                self.lr_scale *= self.policy.lr_factor
                for g in self.optimizer.param_groups:
                    g["lr"] = g["lr"] * self.policy.lr_factor
                if self.scheduler is not None and hasattr(self.scheduler, "base_lrs"):
                    self.scheduler.base_lrs = [lr * self.policy.lr_factor for lr in self.scheduler.base_lrs]
                result["lr"] = [g["lr"] for g in self.optimizer.param_groups]
            elif action in ("raise_density", "raise_window"):
                result.update(self._relax(action))
            elif action == "fallback_adamw":
                result.update(self._fallback())
            elif action == "raise":
                raise RuntimeError(f"guard: {event} at step {self.step_count}: {seen}")
        ev = GuardEvent(self.step_count, event, seen, list(actions), result)
        self._log(ev)
        return ev

    def _microadam(self) -> Any:
        from microadam.optimizer import MicroAdam

        return self.optimizer if isinstance(self.optimizer, MicroAdam) else None

    def _relax(self, action: str) -> dict[str, Any]:
        """Raise each compressed group's density (or window) from its own value, up to the cap.

        When every group is already at the cap, compression cannot be relaxed further: the
        groups fall back to dense AdamW (logged), unless the policy's own next action is that.
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
            if "fallback_adamw" in self.policy.on_error_drift:
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

    def _grads_finite(self) -> bool:
        from microadam.optimizer import grads_all_finite

        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        return self._all_ranks(grads_all_finite(grads), all_of=True)

    @staticmethod
    def _distributed() -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    def _all_ranks(self, flag: bool, all_of: bool) -> bool:
        """Agree across ranks (DDP/FSDP): every rank must take the same decision."""
        if not self._distributed():
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        op = torch.distributed.ReduceOp.MIN if all_of else torch.distributed.ReduceOp.MAX
        torch.distributed.all_reduce(t, op=op)
        return bool(t.item() > 0.5)

    def _mean_over_ranks(self, value: float) -> float:
        """The loss every rank judges: the mean over ranks (a local loss would let ranks disagree)."""
        if not self._distributed():
            return value
        t = torch.tensor([value], dtype=torch.float64)
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t)
        return float(t.item()) / torch.distributed.get_world_size()

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

    def step(self, loss: torch.Tensor | float) -> GuardEvent | None:
        """Check this step's loss and gradients, then step the optimizer or act. Returns the event, if any."""
        go, event = self.before_step(loss)
        if go:
            self.optimizer.step()
            event = self.after_step() or event
        return event

    def before_step(self, loss: torch.Tensor | float | None) -> tuple[bool, GuardEvent | None]:
        """Checks before ``optimizer.step()``: ``(True, None)`` to go ahead, ``(False, event)`` if the guard acted.

        For loops that call ``optimizer.step()`` themselves (Trainer, Lightning): call this first,
        step only if it says so, then call :meth:`after_step`. ``loss`` may be ``None`` when the
        loop does not expose it; then only gradients are checked.
        """
        self.step_count += 1
        p = self.policy
        value = float("nan") if loss is None else float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
        if loss is not None:
            value = self._mean_over_ranks(value)
        finite_loss = loss is None or math.isfinite(value)
        self._pending_loss = value if loss is not None else None
        self._pending_drift = None

        if not finite_loss or not self._grads_finite():
            self.nonfinite_run += 1
            seen = {
                "loss": None if loss is None else (value if finite_loss else str(value)),
                "consecutive": self.nonfinite_run,
            }
            actions = p.on_nonfinite if self.nonfinite_run < p.patience else ("rollback",)
            if self.nonfinite_run >= p.patience:
                self.nonfinite_run = 0
            return False, self._act("nonfinite", seen, actions)
        self.nonfinite_run = 0

        if loss is not None:
            event = self._loss_checks(value)
            if event is not None and tuple(event.actions) != ("none",):
                return False, event

        opt = self._microadam()
        if opt is not None and p.max_error_ratio is not None and self.step_count % p.error_check_every == 0:
            grads = [q.grad for g in opt.param_groups for q in g["params"] if q.grad is not None]
            gnorm = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
            enorm, _ = opt.error_feedback_norm()
            ratio = enorm / gnorm if gnorm > 0 else 0.0
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
        return True, None

    def _loss_checks(self, value: float) -> GuardEvent | None:
        """Spike and reference-curve checks of one finite loss; acts and returns the event if one fires."""
        p = self.policy
        if len(self.losses) >= min(p.warmup, p.spike_window) and self.step_count > p.warmup:
            med = statistics.median(self.losses)
            # Three conditions, each measured necessary on the digits demo: a factor over the
            # median, an absolute floor (near convergence 0.05 against 0.01 is noise), and a new
            # high for the window (per-batch noise of a converging run repeats its own highs).
            if value > p.spike_factor * med and value - med > p.spike_min_delta and value > max(self.losses):
                return self._act("loss_spike", {"loss": value, "running_median": med}, p.on_spike)
        ref = self._reference_at(self.step_count)
        if ref is not None and len(self.losses) >= p.spike_window:
            mean = statistics.fmean(self.losses)
            if mean > ref * (1 + p.reference_margin):
                self.behind_run += 1
                if self.behind_run >= p.patience:
                    self.behind_run = 0
                    seen = {"mean_loss": mean, "reference_loss": ref, "margin": p.reference_margin}
                    return self._act("behind_reference", seen, p.on_behind_reference)
            else:
                self.behind_run = 0
        return None

    def observe_loss(self, loss: torch.Tensor | float) -> GuardEvent | None:
        """For loops that expose the loss only after the step (Lightning): check it, then do
        :meth:`after_step`'s bookkeeping. A spike rolls back the step that was just taken too."""
        value = self._mean_over_ranks(float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss))
        if not math.isfinite(value):
            # The step was already taken (its gradients were finite), so skipping is no longer
            # possible: roll back to before it.
            return self._act("nonfinite", {"loss": str(value)}, ("rollback",))
        event = self._loss_checks(value)
        if event is not None:
            return event
        self._pending_loss = value
        return self.after_step()

    def after_step(self) -> GuardEvent | None:
        """Bookkeeping after a healthy ``optimizer.step()``: history, drift actions, snapshots."""
        if self._pending_loss is not None:
            self.losses.append(self._pending_loss)
        self._healthy_since_snapshot += 1
        event = None
        drift, self._pending_drift, self._pending_loss = self._pending_drift, None, None
        if drift is not None:
            event = self._act("error_drift", drift, self.policy.on_error_drift)
        elif self._healthy_since_snapshot >= self.policy.snapshot_every:
            self.take_snapshot()
        return event
