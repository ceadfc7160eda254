"""Lightning: MicroAdam from configure_optimizers, checkpoint resume, and the guard callback."""

from __future__ import annotations

import json

import pytest
import torch

L = pytest.importorskip("lightning", reason="lightning is in the 'integrations' extra")

from microadam import MicroAdam  # noqa: E402
from microadam.guard import GuardPolicy  # noqa: E402
from microadam.integrations.lightning import GuardCallback  # noqa: E402


class Regressor(L.LightningModule):
    def __init__(self, nan_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
        self.nan_at = nan_at
        self.calls = 0

    def training_step(self, batch, batch_idx):
        self.calls += 1
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if self.calls == self.nan_at:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return MicroAdam(self.parameters(), lr=3e-3, block_size=256, quant_block_size=32, density=0.1)


def _loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = x.sum(1, keepdim=True).tanh()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)


def _trainer(tmp_path, **kw) -> L.Trainer:
    base = dict(
        default_root_dir=str(tmp_path), accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, deterministic=True,
    )  # fmt: skip
    base.update(kw)
    return L.Trainer(**base)


def test_fit_and_resume_from_a_checkpoint(tmp_path):
    L.seed_everything(0)
    full = Regressor()
    _trainer(tmp_path / "a", max_epochs=4, enable_checkpointing=False).fit(full, _loader())
    L.seed_everything(0)
    part = Regressor()
    t = _trainer(tmp_path / "b", max_epochs=2)
    t.fit(part, _loader())
    ckpt = tmp_path / "b.ckpt"
    t.save_checkpoint(ckpt)
    L.seed_everything(0)
    resumed = Regressor()
    t2 = _trainer(tmp_path / "c", max_epochs=4, enable_checkpointing=False)
    t2.fit(resumed, _loader(), ckpt_path=str(ckpt))
    opt = t2.optimizers[0]
    assert isinstance(opt, MicroAdam) and all(s["step"] == 32 for s in opt.state.values())
    assert all(s["error_codes"].dtype == torch.uint8 for s in opt.state.values())
    for a, b in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_guard_callback_skips_a_nan_step(tmp_path):
    log = tmp_path / "guard.jsonl"
    model = Regressor(nan_at=5)
    trainer = _trainer(tmp_path, max_epochs=1, callbacks=[GuardCallback(GuardPolicy(log_path=str(log)))])
    trainer.fit(model, _loader())
    events = [json.loads(x) for x in log.read_text().splitlines()]
    assert [e["event"] for e in events] == ["nonfinite"] and events[0]["actions"] == ["skip"]
    opt = trainer.optimizers[0]
    assert all(s["step"] == 7 for s in opt.state.values())  # 8 batches, one skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _Overflows(Regressor):
    """A loss a million times larger at one step: finite in fp32, but its scaled gradients overflow fp16."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 1e6 if self.calls == 3 else loss


class _SkipsABatch(Regressor):
    """Returns None at one step: Lightning's way to skip a batch (no backward, no scaler step)."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if self.calls == 3 else loss


def test_under_16_mixed_a_skipped_batch_leaves_the_scaler_ready(tmp_path):
    """After a training_step that returned None the plugin neither unscales nor steps its scaler; the
    callback unscaled it, leaving it mid-step, and the next batch raised "unscale_() has already been
    called on this optimizer since the last update()"."""
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    trainer = _trainer(
        tmp_path, max_epochs=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        callbacks=[GuardCallback(GuardPolicy(patience=1))],
    )  # fmt: skip
    trainer.fit(_SkipsABatch(), _loader())
    assert all(s["step"] == 7 for s in trainer.optimizers[0].state.values())  # 8 batches, one returned None


def test_under_16_mixed_an_overflow_is_the_scalers_to_skip_not_a_nonfinite_step(tmp_path):
    """Under precision="16-mixed" the plugin's GradScaler skips an overflow step and lowers its scale.
    The callback did not know the scale, so the guard took the overflow for the model's own non-finite
    gradient, and with patience=1 rolled back. (fp16 autocast runs on CPU here with a CPU GradScaler.)"""
    from lightning.pytorch.plugins import MixedPrecision

    log = tmp_path / "guard.jsonl"
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    trainer = _trainer(
        tmp_path, max_epochs=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        callbacks=[GuardCallback(GuardPolicy(patience=1, log_path=str(log)))],
    )  # fmt: skip
    model = _Overflows()
    trainer.fit(model, _loader())
    events = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(e["step"], e["event"], e["actions"]) for e in events] == [(3, "overflow", ["skip"])]
    assert events[0]["seen"]["grad_scale"] == 2.0**16 and scaler.get_scale() == 2.0**15
    assert all(s["step"] == 7 for s in trainer.optimizers[0].state.values())  # 8 batches, one skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _Recorder(Regressor):
    """Records each training_step's loss as training_step computes it (before Lightning scales it)."""

    def __init__(self, nan_at=(), scheduler: bool = False) -> None:
        super().__init__()
        self.nan_at, self.seen, self.scheduler = set(nan_at), [], scheduler

    def training_step(self, batch, batch_idx):
        self.calls += 1
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.seen.append(float(loss.detach()))
        return loss * float("nan") if self.calls in self.nan_at else loss

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        if not self.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_guard_callback_judges_the_mean_unscaled_loss_over_accumulated_micro_batches(tmp_path):
    model = _Recorder()
    cb = GuardCallback(GuardPolicy(spike_window=100))
    _trainer(tmp_path, max_epochs=1, accumulate_grad_batches=2, callbacks=[cb]).fit(model, _loader())
    pairs = [(a + b) / 2 for a, b in zip(model.seen[::2], model.seen[1::2])]
    assert cb.guard.step_count == 4 and list(cb.guard.losses) == pytest.approx(pairs, rel=1e-6)


def test_guard_callback_keeps_the_scheduler_level_with_the_optimizer_after_a_rollback(tmp_path):
    # Batches 5-7 non-finite: skip, skip, roll back (patience 3) to the snapshot of step 4.
    model = _Recorder(nan_at=(5, 6, 7), scheduler=True)
    cb = GuardCallback(GuardPolicy(snapshot_every=4, patience=3))
    trainer = _trainer(tmp_path, max_epochs=1, callbacks=[cb])
    trainer.fit(model, _loader())
    assert [e.actions for e in cb.guard.events] == [["skip"], ["skip"], ["rollback"]]
    steps = {s["step"] for s in trainer.optimizers[0].state.values()}
    sched = trainer.lr_scheduler_configs[0].scheduler
    # 4 steps, the rollback to step 4, then batch 8 is the 5th: the schedule is at the same point.
    # The two skipped steps still advanced Lightning's scheduler, and the rollback took them back.
    assert steps == {5} and sched.last_epoch == 5
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(3e-3 * 0.9**5)


def test_guard_callback_counts_on_from_the_resumed_global_step(tmp_path):
    # An impossible reference from step 10 on (logged only): the events name the steps the guard counts.
    ref = [(0, 100.0), (9, 100.0), (10, 1e-9), (100, 1e-9)]

    def callback(name):
        return GuardCallback(GuardPolicy(reference_curve=ref, spike_window=1, warmup=1, patience=1,
                                         on_behind_reference=("none",), log_path=str(tmp_path / name)))  # fmt: skip

    t = _trainer(tmp_path / "a", max_epochs=1)
    t.fit(Regressor(), _loader())
    ckpt = tmp_path / "a.ckpt"
    t.save_checkpoint(ckpt)
    cb = callback("resumed.jsonl")
    t2 = _trainer(tmp_path / "b", max_epochs=2, enable_checkpointing=False, callbacks=[cb])
    t2.fit(Regressor(), _loader(), ckpt_path=str(ckpt))
    assert cb.guard.step_count == t2.global_step == 16
    events = [json.loads(x)["step"] for x in (tmp_path / "resumed.jsonl").read_text().splitlines()]
    assert events == list(range(10, 17))


def test_a_resumed_fit_keeps_the_guards_counters(tmp_path):
    """fit(ckpt_path=...) built the guard anew: the reference lag (where reference_curve is read), the loss
    history and the rollbacks that max_total_rollbacks counts over every resume started at 0."""

    def callback():
        return GuardCallback(GuardPolicy(snapshot_every=1, patience=1, max_total_rollbacks=1))

    first = callback()
    t = _trainer(tmp_path / "a", max_epochs=1, callbacks=[first])
    t.fit(Regressor(nan_at=3), _loader())  # step 3 rolled back to step 2's snapshot
    assert first.guard.rollbacks == 1 and first.guard.reference_lag == 1
    ckpt = tmp_path / "a.ckpt"
    t.save_checkpoint(ckpt)
    cb = callback()
    t2 = _trainer(tmp_path / "b", max_epochs=2, enable_checkpointing=False, callbacks=[cb])
    t2.fit(Regressor(), _loader(), ckpt_path=str(ckpt))
    assert cb.guard.rollbacks_before_resume == 1 and cb.guard.reference_lag == first.guard.reference_lag
    # A rollback after the resume is the second over the run: beyond max_total_rollbacks=1.
    t3 = _trainer(tmp_path / "c", max_epochs=2, enable_checkpointing=False, callbacks=[callback()])
    with pytest.raises(RuntimeError, match=r"rolled back 2 times over this run and the runs it resumed"):
        t3.fit(Regressor(nan_at=1), _loader(), ckpt_path=str(ckpt))


def test_guard_callback_refuses_more_than_one_optimizer(tmp_path):
    """With two optimizers (manual optimization) the callback guarded the first one only: it checked only
    its gradients, once per optimizer, and a rollback put back every weight but only its state (the
    second optimizer's NaN moments stayed, and the run rolled back until max_rollbacks stopped it)."""

    class TwoOptimizers(Regressor):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            for opt in self.optimizers():
                opt.zero_grad()
            self.manual_backward(loss)
            for opt in self.optimizers():
                opt.step()
            return loss

        def configure_optimizers(self):
            return [MicroAdam(self.net[0].parameters(), lr=1e-3), MicroAdam(self.net[2].parameters(), lr=1e-3)]

    trainer = _trainer(tmp_path, max_epochs=1, callbacks=[GuardCallback(GuardPolicy())])
    with pytest.raises(ValueError, match=r"exactly one optimizer, and this Trainer has 2 .*a param group per module"):
        trainer.fit(TwoOptimizers(), _loader())
