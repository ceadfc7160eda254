"""Lightning: MicroAdam in ``configure_optimizers`` and the guard as a Callback.

::

    import lightning as L
    from microadam import MicroAdam
    from microadam.integrations.lightning import GuardCallback

    class Model(L.LightningModule):
        def configure_optimizers(self):
            return MicroAdam(self.parameters(), lr=1e-4)

    L.Trainer(callbacks=[GuardCallback(GuardPolicy(log_path="guard.jsonl"))]).fit(Model(), loader)

Lightning runs the training step inside ``optimizer.step(closure)``. The
callback checks the gradients in ``on_before_optimizer_step`` (after backward,
before the update; a skip drops the gradients so the update changes nothing),
and the loss in ``on_train_batch_end``, where a spike rolls back to the last
good snapshot, the step just taken included. Checkpoints: Lightning saves
``optimizer.state_dict()`` and restores it with ``load_state_dict``; both are
MicroAdam's own (integer state kept exact).
"""

from __future__ import annotations

from typing import Any

import torch

from microadam.guard import Guard, GuardPolicy, unscaled_grad_scale

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on the environment
    try:
        import pytorch_lightning as pl
    except ImportError as e:
        raise ImportError("microadam.integrations.lightning needs lightning: pip install lightning") from e

__all__ = ["GuardCallback"]


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)


class GuardCallback(pl.Callback):
    """Run a :class:`~microadam.guard.Guard` inside a Lightning ``Trainer`` (automatic optimization).

    The guard judges the mean training loss over the micro-batches of each optimizer step
    (Lightning divides each one by ``accumulate_grad_batches``; the callback multiplies it back).
    After a resume (``fit(ckpt_path=...)``) its step count starts at ``trainer.global_step``.
    """

    def __init__(self, policy: GuardPolicy | None = None) -> None:
        self.policy = policy or GuardPolicy()
        self.guard: Guard | None = None
        self._went = False
        self._stepped = False  # an optimizer step (taken or skipped) ends this batch
        self._losses: list[float] = []
        self._interval = "step"
        self._resumed: dict[str, Any] | None = None  # the guard's counters in the checkpoint resumed from

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if len(trainer.optimizers) != 1:
            # Snapshots hold the whole module: with two optimizers a rollback put back every weight but
            # only the first optimizer's state, and only its gradients were checked (once per optimizer).
            raise ValueError(
                f"GuardCallback guards exactly one optimizer, and this Trainer has {len(trainer.optimizers)} "
                "(configure_optimizers): return one optimizer, with a param group per module if they need "
                "other settings, or train without the callback"
            )
        configs = getattr(trainer, "lr_scheduler_configs", None) or []
        scheduler = configs[0].scheduler if configs else None
        self._interval = configs[0].interval if configs else "step"
        self.guard = Guard(
            pl_module, _unwrap(trainer.optimizers[0]), self.policy, scheduler=scheduler, start_step=trainer.global_step
        )
        # Every snapshot here is taken after Lightning's scheduler step (on_train_batch_end), the first
        # one too, and this callback restores the schedule after a rollback itself (below).
        self.guard.restores_schedule = False
        if self._resumed is not None:
            # fit(ckpt_path=...): the guard goes on with the run's reference lag, loss history and
            # rollback counts (max_total_rollbacks counts over every resume), not from zero.
            resumed, self._resumed = self._resumed, None
            self.guard.load_counters(resumed, f"the checkpoint of step {resumed.get('step')}")

    def state_dict(self) -> dict[str, Any]:
        """The guard's counters, saved in Lightning's checkpoint (``Guard.counters``)."""
        return {"guard": self.guard.counters()} if self.guard is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Called by Lightning when it resumes, before ``on_train_start`` builds the guard."""
        self._resumed = state_dict.get("guard")

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        assert self.guard is not None, "on_train_start creates the guard"
        # Under precision="16-mixed", the precision plugin's GradScaler, which has unscaled the gradients,
        # except after a training_step that returned None: it then neither unscales nor steps the scaler.
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        scale = unscaled_grad_scale(scaler, _unwrap(optimizer), unscale=False)
        go, event = self.guard.before_step(None, grad_scale=scale)
        self._went, self._stepped = go, True
        if not go:
            for group in _unwrap(optimizer).param_groups:
                for p in group["params"]:
                    p.grad = None
        # Lightning steps a per-step scheduler after this batch whatever the guard did. Its
        # snapshots are taken after that step (in on_train_batch_end), so a rollback here restores
        # a scheduler level with the optimizer, and Lightning's step would put it one ahead for the
        # rest of the run: the guard holds the restored schedule, put back after Lightning's step.
        rolled_back = event is not None and "rollback" in event.actions
        if rolled_back and self.guard.scheduler is not None and self._interval == "step":
            self.guard.hold_schedule()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.guard is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            # Lightning divided the loss by accumulate_grad_batches (for backward); the guard compares
            # losses with a reference curve and with each other, in the loss's own units.
            self._losses.append(float(loss.detach()) * trainer.accumulate_grad_batches)
        if not self._stepped:  # a micro-batch inside an accumulation window
            return
        self._stepped = False
        losses, self._losses = self._losses, []
        self.guard.settle_schedule()  # after a rollback in on_before_optimizer_step (nothing otherwise)
        if not self._went:
            return
        self._went = False
        if losses:
            self.guard.observe_loss(sum(losses) / len(losses))
        else:
            self.guard.after_step()
