"""Checkpoints: weights_only loading, exact integer state, bitwise resume, refusal of mismatches."""

from __future__ import annotations

import io

import pytest
import torch

from microadam import MicroAdam
from tests.common import CONFIGS, Config, ids

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


@pytest.mark.parametrize(
    "key,value",
    [("window", 5), ("density", 0.2), ("block_size", 32), ("quant_block_size", 32)],
)
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
    sd = opt.state_dict()
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
    sd = opts["b"].state_dict()
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
