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

from microadam.guard import Guard, GuardPolicy

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
    """Run a :class:`~microadam.guard.Guard` inside a Lightning ``Trainer`` (automatic optimization)."""

    def __init__(self, policy: GuardPolicy | None = None) -> None:
        self.policy = policy or GuardPolicy()
        self.guard: Guard | None = None
        self._went = False

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        configs = getattr(trainer, "lr_scheduler_configs", None) or []
        scheduler = configs[0].scheduler if configs else None
        self.guard = Guard(pl_module, _unwrap(trainer.optimizers[0]), self.policy, scheduler=scheduler)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        assert self.guard is not None, "on_train_start creates the guard"
        go, _ = self.guard.before_step(None)
        self._went = go
        if not go:
            for group in _unwrap(optimizer).param_groups:
                for p in group["params"]:
                    p.grad = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.guard is None or not self._went:
            return
        # Once per optimizer step: with gradient accumulation this hook runs for every micro-batch.
        self._went = False
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self.guard.observe_loss(loss)
        else:
            self.guard.after_step()
