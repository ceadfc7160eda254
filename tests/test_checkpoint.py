"""Checkpoints: weights_only loading, exact integer state, bitwise resume, refusal of mismatches."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from microadam import MicroAdam
from tests.common import CONFIGS, Config, ids, trained_linear_8x8

KW = dict(lr=1e-2, window=4, density=0.1, block_size=64, quant_block_size=16, weight_decay=0.01)


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 33), torch.nn.ReLU(), torch.nn.Linear(33, 3)).to(dtype)


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 20, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, batches) -> list[float]:
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x.to(next(model.parameters()).dtype)).float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _roundtrip(obj) -> dict:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", ids([c for c in CONFIGS if c.id != "paper-defaults"]))
def test_save_load_continue_is_bitwise_identical(config: Config, dtype: torch.dtype):
    kwargs = dict(config.kwargs, lr=1e-2)
    batches = _batches(20)
    # Uninterrupted.
    m1 = _model(dtype)
    o1 = MicroAdam(m1.parameters(), **kwargs)
    l1 = _train(m1, o1, batches)
    # Stopped after 7 steps (window 4: the ring has wrapped), saved, loaded into fresh objects.
    m2 = _model(dtype)
    o2 = MicroAdam(m2.parameters(), **kwargs)
    l2 = _train(m2, o2, batches[:7])
    ckpt = _roundtrip({"model": m2.state_dict(), "optim": o2.state_dict()})
    m3 = _model(dtype)
    m3.load_state_dict(ckpt["model"])
    o3 = MicroAdam(m3.parameters(), **kwargs)
    o3.load_state_dict(ckpt["optim"])
    l2 += _train(m3, o3, batches[7:])
    assert l1 == l2
    for a, b in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(a, b)
    for p1, p3 in zip(m1.parameters(), m3.parameters()):
        s1, s3 = o1.state[p1], o3.state[p3]
        assert s1.keys() == s3.keys()
        for key in s1:
            if isinstance(s1[key], torch.Tensor):
                assert s1[key].dtype == s3[key].dtype and torch.equal(s1[key], s3[key]), key
            else:
                assert s1[key] == s3[key]


def test_state_dict_is_plain_and_keeps_integer_dtypes():
    model = _model(torch.float16)
    opt = MicroAdam(model.parameters(), **KW)
    _train(model, opt, _batches(3))
    sd = _roundtrip(opt.state_dict())
    for st in sd["state"].values():
        assert isinstance(st["step"], int) and st["step"] == 3
        assert st["window_indices"].dtype == torch.int16
        assert st["window_values"].dtype == torch.bfloat16
        assert st["error_codes"].dtype == torch.uint8
    fresh = MicroAdam(model.parameters(), **KW)
    fresh.load_state_dict(sd)
    for p in model.parameters():
        st = fresh.state[p]
        # torch's default load would have cast these to float16.
        assert st["window_indices"].dtype == torch.int16 and st["error_codes"].dtype == torch.uint8
        assert st["window_values"].dtype == torch.bfloat16 and st["error_bounds"].dtype == torch.bfloat16
        assert torch.equal(st["window_indices"], opt.state[p]["window_indices"])
        assert st["step"] == 3


def test_loaded_state_is_a_copy():
    model = _model()
    opt = MicroAdam(model.parameters(), **KW)
    _train(model, opt, _batches(2))
    sd = opt.state_dict()
    fresh = MicroAdam(model.parameters(), **KW)
    fresh.load_state_dict(sd)
    _train(model, fresh, _batches(1))
    p = next(model.parameters())
    assert opt.state[p]["step"] == 2 and fresh.state[p]["step"] == 3


def test_hyperparameters_come_from_the_checkpoint_like_torch():
    model = _model()
    opt = MicroAdam(model.parameters(), **dict(KW, lr=0.5))
    _train(model, opt, _batches(1))
    fresh = MicroAdam(model.parameters(), **KW)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("key,value", [("window", 6), ("density", 0.2)])
def test_a_checkpoint_taken_after_reconfigure_resumes_in_an_optimizer_built_as_configured(key, value):
    """reconfigure() (the Guard's raise_density) changed density during a run; Trainer and Lightning build
    the optimizer as configured and load the checkpoint, which was refused ("saved with density=0.2")."""
    import copy

    model = _model()
    opt = MicroAdam(model.parameters(), **KW)
    _train(model, opt, _batches(2))
    opt.reconfigure(**{key: value})
    _train(model, opt, _batches(1))
    sd = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    resumed = MicroAdam(twin.parameters(), **KW)
    with pytest.warns(UserWarning, match=f"resumes with {key}={value!r} from the checkpoint .*built with {key}="):
        resumed.load_state_dict(sd)
    assert resumed.param_groups[0][key] == value
    _train(model, opt, _batches(3)[1:])
    _train(twin, resumed, _batches(3)[1:])
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("key,value", [("block_size", 32), ("quant_block_size", 32)])
def test_other_layout_raises_naming_both_values_and_changes_nothing(key, value):
    model = _model()
    opt = MicroAdam(model.parameters(), **KW)
    _train(model, opt, _batches(2))
    sd = opt.state_dict()
    other = MicroAdam(model.parameters(), **dict(KW, **{key: value}))
    _train(model, other, _batches(1))
    before = {k: v.clone() for k, v in other.state[next(model.parameters())].items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError) as info:
        other.load_state_dict(sd)
    msg = str(info.value)
    assert f"{key}={KW[key]!r}" in msg and f"{key}={value!r}" in msg
    after = other.state[next(model.parameters())]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_other_parameter_shape_raises():
    small, big = torch.nn.Linear(10, 4), torch.nn.Linear(10, 5)
    opt = MicroAdam(small.parameters(), **KW)
    for p in small.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    other = MicroAdam(big.parameters(), **KW)
    with pytest.raises(ValueError, match="40 elements.*50"):
        other.load_state_dict(opt.state_dict())


def test_corrupt_state_raises_and_changes_nothing():
    model = _model()
    opt = MicroAdam(model.parameters(), **KW)
    _train(model, opt, _batches(2))
    sd = copy.deepcopy(opt.state_dict())  # edited below: the entries are the optimizer's live ones
    good = sd["state"][0]["window_indices"]
    sd["state"][0]["window_indices"] = good.float()
    with pytest.raises(ValueError, match="window_indices.*corrupt"):
        opt.load_state_dict(sd)
    assert opt.state[next(model.parameters())]["window_indices"].dtype == torch.int16
    sd["state"][0]["window_indices"] = good
    del sd["state"][1]["error_codes"]
    with pytest.raises(ValueError, match="lacks"):
        opt.load_state_dict(sd)
    with pytest.raises(ValueError, match="missing"):
        opt.load_state_dict({"state": {}})


def test_wrong_number_of_groups_or_params_raises():
    model = _model()
    opt = MicroAdam(model.parameters(), **KW)
    params = list(model.parameters())
    two = MicroAdam([dict(params=params[:2]), dict(params=params[2:])], **KW)
    with pytest.raises(ValueError, match="groups"):
        two.load_state_dict(opt.state_dict())
    fewer = MicroAdam(params[:3], **KW)
    with pytest.raises(ValueError, match="parameters"):
        fewer.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_a_state_saved_with_other_strides_loads_contiguous(impl):
    """load_state_dict copied with .to(copy=True), which keeps a dense tensor's strides: a state whose
    tensors were saved transposed (same values) made the torch path fail in a view."""
    torch.manual_seed(0)
    init = torch.randn(100)
    params = {name: torch.nn.Parameter(init.clone()) for name in ("a", "b")}
    opts = {name: MicroAdam([p], lr=1e-2, window=2, density=0.1, block_size=32, quant_block_size=8, impl=impl)
            for name, p in params.items()}  # fmt: skip
    grad = torch.randn(100)
    for name, p in params.items():
        p.grad = grad.clone()
        opts[name].step()
    sd = copy.deepcopy(opts["b"].state_dict())  # edited below: the entries are the optimizer's live ones
    for key, t in list(sd["state"][0].items()):
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            # The same values, column-major: dense but not contiguous.
            sd["state"][0][key] = t.mT.contiguous().mT
            assert not sd["state"][0][key].is_contiguous()
    opts["b"].load_state_dict(sd)
    for name, p in params.items():
        p.grad = grad.flip(0)
        opts[name].step()
    assert torch.equal(params["a"], params["b"])
    assert all(t.is_contiguous() for t in opts["b"].state[params["b"]].values() if isinstance(t, torch.Tensor))


def _stepped(steps: int = 3, **kw) -> tuple[torch.nn.Module, MicroAdam]:
    model = _model()
    opt = MicroAdam(model.parameters(), **{**KW, **kw})
    _train(model, opt, _batches(steps))
    return model, opt


def test_a_checkpoint_taken_where_a_scheduler_left_lr_a_hair_below_zero_loads():
    # LinearLR(start_factor=0.1, end_factor=0.0) ends at -4.4e-20 here by rounding: a step takes that value,
    # as torch's optimizers do, and a checkpoint saved then must load, and reconfigure must run.
    model, opt = _stepped()
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, end_factor=0.0, total_iters=5)
    for _ in range(5):
        sched.step()
    assert opt.param_groups[0]["lr"] < 0
    sd = _roundtrip(opt.state_dict())
    fresh = MicroAdam(model.parameters(), **KW)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    opt.reconfigure(density=0.2)
    assert opt.param_groups[0]["density"] == 0.2


def test_numpy_scalars_a_scheduler_set_are_saved_as_python_numbers():
    np = pytest.importorskip("numpy")
    model, opt = _stepped()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: np.float32(0.5) ** t)
    sched.step()
    assert type(opt.param_groups[0]["lr"]).__module__ == "numpy"
    sd = _roundtrip(opt.state_dict())  # torch.load(weights_only=True) refuses NumPy scalars
    assert type(sd["param_groups"][0]["lr"]) is float
    assert sd["param_groups"][0]["lr"] == float(opt.param_groups[0]["lr"])


def test_another_optimizers_state_dict_is_refused_naming_its_keys():
    # A never-stepped AdamW has no state to refuse: its groups would have set AdamW's weight decay and
    # turned the default variant into the paper's without a word.
    model = _model()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = MicroAdam(model.parameters(), **KW)
    before = [dict(g, params=None) for g in opt.param_groups]
    with pytest.raises(ValueError, match=r"none of MicroAdam's settings .*'amsgrad'.*another optimizer"):
        opt.load_state_dict(adamw.state_dict())
    assert [dict(g, params=None) for g in opt.param_groups] == before


def test_state_dict_post_hooks_see_and_may_replace_the_final_dict():
    model, opt = _stepped()
    seen = []

    def hook(optimizer, sd):
        seen.append(sorted(sd["state"]))
        return {"wrapped": sd}

    opt.register_state_dict_post_hook(hook)
    out = opt.state_dict()
    assert list(out) == ["wrapped"]  # what the hook returned is what the caller gets, as in torch
    assert seen == [sorted(out["wrapped"]["state"])]


def test_a_users_own_state_entry_is_saved_and_loaded_as_torch_does():
    model, opt = _stepped()
    opt.state["ema_decay"] = 3
    sd = _roundtrip(opt.state_dict())
    assert sd["state"]["ema_decay"] == 3
    fresh = MicroAdam(model.parameters(), **KW)
    fresh.load_state_dict(sd)
    assert fresh.state["ema_decay"] == 3
    # A parameter's state under a key that is no index would be lost unseen as a user's entry: refused.
    sd["state"]["0"] = sd["state"].pop(0)
    with pytest.raises(ValueError, match=r"under the key .0., which no group lists"):
        MicroAdam(model.parameters(), **KW).load_state_dict(sd)


def test_parameters_on_the_meta_device_get_their_state_and_are_counted():
    # A shape-only dry run (e.g. to measure the state's size) steps meta tensors, as torch's optimizers do.
    from microadam import state_bytes

    with torch.device("meta"):
        model = torch.nn.Linear(64, 64)
    real = torch.nn.Linear(64, 64)
    opts = [MicroAdam(m.parameters(), **KW) for m in (model, real)]
    for m, opt in zip((model, real), opts):
        m(torch.randn(2, 64, device=m.weight.device)).sum().backward()
        opt.step()
        opt.step()
    assert opts[0].state[model.weight]["step"] == 2
    assert opts[0].state[model.weight]["window_values"].is_meta
    assert state_bytes(opts[0]) == state_bytes(opts[1])


def test_groups_listing_unhashable_ids_are_refused_as_corrupt():
    model, opt = _stepped()
    sd = opt.state_dict()
    sd["param_groups"][0]["params"] = [[i] for i in sd["param_groups"][0]["params"]]
    with pytest.raises(ValueError, match="unhashable ids .*corrupt"):
        MicroAdam(model.parameters(), **KW).load_state_dict(sd)


def test_impl_is_this_machines_choice_not_the_checkpoints():
    """A checkpoint of a GPU run built with impl="triton" overrode impl=None on load, and the first step
    on a CPU machine failed ("impl='triton' needs a CUDA device")."""
    model = _model()
    opt = MicroAdam(model.parameters(), **KW)
    _train(model, opt, _batches(1))
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        g["impl"] = "triton"  # as a run on a GPU saves it
    fresh = MicroAdam(model.parameters(), **KW)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["impl"] is None
    _train(model, fresh, _batches(1))


def test_reconfigure_takes_numpy_scalars_as_the_constructor_does():
    np = pytest.importorskip("numpy")
    model = _model()
    opt = MicroAdam(model.parameters(), **dict(KW, density=np.float32(0.05), window=np.int64(3)))
    _train(model, opt, _batches(1))
    opt.reconfigure(density=np.float32(0.1), window=np.int64(5))
    assert opt.param_groups[0]["density"] == pytest.approx(0.1) and opt.param_groups[0]["window"] == 5
    assert type(opt.param_groups[0]["window"]) is int


def test_a_meta_device_dry_runs_state_is_refused_by_name():
    """A dry run's state (meta tensors) loaded into a real optimizer raised "Tensor.item() cannot be called
    on meta tensors", naming neither the parameter nor the key."""
    with torch.device("meta"):
        dry_model = torch.nn.Linear(64, 8)
    dry = MicroAdam(dry_model.parameters(), lr=1e-3)
    for p in dry_model.parameters():
        p.grad = torch.empty_like(p)
    dry.step()
    opt = MicroAdam(torch.nn.Linear(64, 8).parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="loaded 'window_indices' of parameter 0 is on the meta device"):
        opt.load_state_dict(dry.state_dict())
    assert len(opt.state) == 0
    with pytest.raises(ValueError, match="error_feedback_norm: the parameters are on the meta device"):
        dry.error_feedback_norm()


def test_a_load_refused_under_torch_distributed_checkpoint_leaves_no_mixed_state(tmp_path):
    """torch.distributed.checkpoint loads in place: dcp.load fills get_state_dict()'s template, which
    holds the live state tensors, and set_optimizer_state_dict(full_state_dict=True) fills a template
    it asks for. A load refused after that left the checkpoint's values with this run's counters (the
    next step found window indices of another layout). The full-state template is now a copy (nothing
    changes); after dcp.load the overwritten state is dropped, and the error says so."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        get_state_dict,
        set_optimizer_state_dict,
        set_state_dict,
    )

    saved_model, saved_opt = trained_linear_8x8(48, seed=1)
    full = get_optimizer_state_dict(saved_model, saved_opt, options=StateDictOptions(full_state_dict=True))
    model, opt = trained_linear_8x8(32, seed=2)
    (p,) = model.parameters()
    before = {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
    with pytest.raises(ValueError, match="saved with block_size=48 but this optimizer has block_size=32"):
        set_optimizer_state_dict(model, opt, full, options=StateDictOptions(full_state_dict=True))
    assert opt.state[p]["step"] == 3 and all(torch.equal(v, opt.state[p][k]) for k, v in before.items())

    msd, osd = get_state_dict(saved_model, saved_opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path / "ckpt"))
    msd, osd = get_state_dict(model, opt)
    template = {"model": msd, "optim": osd}
    dcp.load(template, checkpoint_id=str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match=r"block_size=48.*state of parameter\(s\) \[0\].*was dropped"):
        set_state_dict(model, opt, model_state_dict=template["model"], optim_state_dict=template["optim"])
    assert p not in opt.state or not opt.state[p]
    opt.zero_grad()
    model(torch.randn(4, 8)).square().mean().backward()
    opt.step()  # starts the state afresh
    assert opt.state[p]["step"] == 1


def test_a_state_dict_kept_while_training_goes_on_is_saved_whole():
    """state_dict() copied each entry but shared its tensors, as torch shares them: a dict kept (by
    reference, or by a writer that saves it later) while training went on held the step count of when
    it was taken with the tensors of later steps, and the run resumed from it diverged in silence (2.6e-3
    after 4 steps). Entries are now the live ones, as in torch: the dict saves the later state, whole."""
    model = _model()
    opt = MicroAdam(model.parameters(), **KW)
    batches = _batches(10)
    _train(model, opt, batches[:4])
    kept = opt.state_dict()
    _train(model, opt, batches[4:5])  # one more step before the kept dict is written
    saved = _roundtrip({"model": model.state_dict(), "opt": kept})
    resumed = _model()
    resumed.load_state_dict(saved["model"])
    resumed_opt = MicroAdam(resumed.parameters(), **KW)
    resumed_opt.load_state_dict(saved["opt"])
    assert _train(resumed, resumed_opt, batches[5:]) == _train(model, opt, batches[5:])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))


def test_the_count_of_skipped_steps_is_saved_and_loaded():
    """Copies (deepcopy, pickle) kept optimizer.skipped_steps but checkpoints did not: a resumed run
    counted from 0. A count that is not a whole number >= 0 is refused, changing nothing."""
    model = _model()
    opt = MicroAdam(model.parameters(), **KW)
    _train(model, opt, _batches(2))
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        opt.step()
    saved = _roundtrip(opt.state_dict())
    assert saved["skipped_steps"] == 1
    fresh = MicroAdam(model.parameters(), **KW)
    fresh.load_state_dict(saved)
    assert fresh.skipped_steps == 1
    saved["skipped_steps"] = -1
    with pytest.raises(ValueError, match="the loaded 'skipped_steps' is -1, not a whole number >= 0"):
        fresh.load_state_dict(saved)
    assert fresh.skipped_steps == 1
    del saved["skipped_steps"]  # as torch.distributed.checkpoint keeps only "state" and "param_groups"
    fresh.load_state_dict(saved)
    assert fresh.skipped_steps == 1
