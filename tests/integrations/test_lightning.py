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
