"""Hugging Face Trainer: MicroAdam as the optimizer, and the guard as a callback.

Optimizer, either way::

    from microadam import MicroAdam
    trainer = Trainer(model, args, train_dataset=ds,
                      optimizer_cls_and_kwargs=(MicroAdam, {"lr": 1e-4, "density": 0.01}))
    # or: optimizers=(MicroAdam(model.parameters(), lr=1e-4), None)

``resume_from_checkpoint`` works: Trainer saves ``optimizer.state_dict()`` with
``torch.save`` and loads it with ``torch.load(weights_only=True)``; MicroAdam's
state is plain tensors and ints, and its ``load_state_dict`` keeps the integer
state exact.

The guard::

    from microadam.guard import GuardPolicy
    from microadam.integrations.hf import GuardCallback
    trainer.add_callback(GuardCallback(GuardPolicy(snapshot_every=200, log_path="guard.jsonl")))

The callback reads each training loss from the model's output (a forward hook
on ``outputs.loss``), checks it and the gradients in ``on_pre_optimizer_step``,
and, where the guard skips or rolls back, drops the gradients so Trainer's
``optimizer.step()`` changes nothing. Under ``fp16=True`` it gives the guard the
scale of Trainer's ``GradScaler``, so an fp16 overflow is skipped (and left to the
scaler), not counted as a non-finite step.

The loss it judges is the step's loss as Trainer logs it. Over gradient
accumulation that is the mean of the micro-batches' losses, except where Trainer
passes ``num_items_in_batch`` to the model (models that accept loss keyword
arguments, e.g. every causal LM): each micro-batch's loss is then its share of
the step's (its summed token losses over the whole step's token count), and
the step's loss is their sum. A model that accepts the argument but ignores it
is logged by Trainer, and judged here, at that many times its mean.

Where the model returns no loss (Trainer computes it itself: a
``label_smoothing_factor``, a ``compute_loss_func``, a ``compute_loss``
override), only the gradients can be checked; the callback warns once.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from microadam.guard import Guard, GuardPolicy, unscaled_grad_scale

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("microadam.integrations.hf needs transformers: pip install transformers") from e

__all__ = ["GuardCallback"]

_STATE_KEY = "microadam.GuardCallback"  # the guard's counters in TrainerState.stateful_callbacks


class GuardCallback(TrainerCallback):
    """Run a :class:`~microadam.guard.Guard` inside ``transformers.Trainer``."""

    def __init__(self, policy: GuardPolicy | None = None) -> None:
        self.policy = policy or GuardPolicy()
        self.guard: Guard | None = None
        self._losses: list[float] = []
        self._shares = False  # the micro-batch losses are shares of the step's (num_items_in_batch)
        self._warned_no_loss = False
        self._hook: Any = None

    def _capture(self, module: torch.nn.Module, inputs: Any, kwargs: dict[str, Any], output: Any) -> None:
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        if isinstance(loss, torch.Tensor) and module.training and loss.numel() == 1:
            self._losses.append(float(loss.detach()))
            # Trainer passes the step's token count only to models that take loss keyword arguments;
            # it then adds their micro-batch losses instead of averaging them (its training_step).
            self._shares = kwargs.get("num_items_in_batch") is not None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, optimizer = kwargs["model"], kwargs["optimizer"]
        # accelerate wraps the optimizer; the guard needs the real one (compression actions, state).
        optimizer = getattr(optimizer, "optimizer", optimizer)
        # After resume_from_checkpoint, global_step is the step resumed from: the guard counts on
        # from it, so reference_curve is read at the run's real step.
        self.guard = Guard(
            model, optimizer, self.policy, scheduler=kwargs.get("lr_scheduler"), start_step=state.global_step
        )
        # After resume_from_checkpoint the Trainer state is the checkpoint's, with the counters this
        # callback left in it (on_step_end): the guard goes on with the run's reference lag, loss history
        # and rollback counts (max_total_rollbacks counts over every resume), not from zero.
        saved = getattr(state, "stateful_callbacks", None)  # transformers >= 4.41
        resumed = saved.get(_STATE_KEY) if isinstance(saved, dict) and state.global_step else None
        if resumed:
            self.guard.load_counters(resumed["attributes"], f"the checkpoint of step {state.global_step}")
        # A train() that raised never reached on_train_end: its hook would count every loss twice.
        if self._hook is not None:
            self._hook.remove()
        self._losses.clear()
        self._hook = model.register_forward_hook(self._capture, with_kwargs=True)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.guard is not None, "on_train_begin creates the guard"
        loss = None
        if self._losses:
            loss = sum(self._losses) if self._shares else sum(self._losses) / len(self._losses)
            if self._shares and getattr(args, "average_tokens_across_devices", False) and args.world_size > 1:
                # Each rank's share is over the token count of every rank; Trainer multiplies it by the
                # number of ranks after the forward pass (which the hook does not see), and the guard
                # averages over ranks: scaled the same way, the guard judges the logged loss.
                loss *= args.world_size
        elif not self._warned_no_loss:
            warnings.warn(
                "GuardCallback: the model returned no loss this step (Trainer computes it itself with "
                "label_smoothing_factor, compute_loss_func or a compute_loss override), so only gradients "
                "are checked: loss spikes and reference_curve are not; use microadam.guard.Guard in your "
                "own loop to pass the loss",
                RuntimeWarning,
                stacklevel=2,
            )
            self._warned_no_loss = True
        self._losses.clear()
        # Under fp16=True, Trainer's GradScaler: accelerate's optimizer wrapper holds it.
        scale = unscaled_grad_scale(getattr(kwargs.get("optimizer"), "scaler", None), self.guard.optimizer)
        go, _ = self.guard.before_step(loss, grad_scale=scale)
        self._went = go
        if not go:
            # Trainer calls optimizer.step() next regardless: with no gradients it changes nothing.
            for group in self.guard.optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.guard is not None and getattr(self, "_went", False):
            self.guard.after_step()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # After Trainer's lr_scheduler.step() and before it may save a checkpoint: a rollback to the
        # first snapshot has its schedule put back now, so that the checkpoint holds it.
        if self.guard is not None:
            self.guard.settle_schedule()
            # Into the Trainer state, which Trainer writes to trainer_state.json with each checkpoint.
            # Under a key of no callback class: Trainer's restore_callback_states_from_checkpoint would
            # otherwise replace this callback with one built from saved arguments (a default policy).
            if isinstance(getattr(state, "stateful_callbacks", None), dict):
                state.stateful_callbacks[_STATE_KEY] = {"args": {}, "attributes": self.guard.counters()}

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
