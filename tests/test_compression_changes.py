"""Changing compression on a live optimizer: raising window/density, falling back to dense AdamW."""

from __future__ import annotations

import io

import pytest
import torch

from microadam import MicroAdam, state_bytes
from microadam.reference import ReferenceMicroAdam
from tests.common import assert_close

KW = dict(lr=1e-2, window=4, density=0.1, block_size=64, quant_block_size=16)


def _setup(seed: int = 0, **kw):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(300, generator=gen)), torch.nn.Parameter(torch.randn(7, 9, generator=gen))]
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(30)]
    return params, grads, MicroAdam(params, **dict(KW, **kw))


def _steps(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


def test_raising_the_window_before_it_wraps_equals_the_larger_window_from_the_start():
    p1, grads, o1 = _setup()
    _steps(o1, p1, grads[:3])
    o1.reconfigure(window=8)
    _steps(o1, p1, grads[3:])
    p2, _, o2 = _setup(window=8)
    _steps(o2, p2, grads)
    for a, b in zip(p1, p2):
        assert torch.equal(a, b)
    assert o1.param_groups[0]["window"] == 8 and o1.state[p1[0]]["window_indices"].shape[0] == 8


def _moments(opt):
    """exp_avg/exp_avg_sq a fallback would build: the window's sums plus the error feedback."""
    group = opt.param_groups[0]
    kw = dict(KW, window=group["window"], density=group["density"])
    clone = MicroAdam([torch.nn.Parameter(p.detach().clone()) for p in group["params"]], **kw)
    clone.load_state_dict(opt.state_dict())
    clone.fallback_to_adamw()
    return [(s["exp_avg"].clone(), s["exp_avg_sq"].clone()) for s in clone.state.values()]


@pytest.mark.parametrize("change", [dict(density=0.3), dict(window=6), dict(density=0.25, window=9)])
def test_raising_density_or_window_loses_nothing(change):
    params, grads, opt = _setup()
    _steps(opt, params, grads[:10])  # the 4-slot ring has wrapped
    before = _moments(opt)
    codes = [opt.state[p]["error_codes"].clone() for p in params]
    bytes_before = state_bytes(opt)
    opt.reconfigure(**change)
    after = _moments(opt)
    for (m0, v0), (m1, v1) in zip(before, after):
        assert torch.equal(m0, m1) and torch.equal(v0, v1)
    assert all(torch.equal(c, opt.state[p]["error_codes"]) for c, p in zip(codes, params))
    expected = sum(MicroAdam.layout(p, opt.param_groups[0]).state_bytes for p in params)
    assert state_bytes(opt) == expected > bytes_before
    _steps(opt, params, grads[10:])  # and it keeps training
    assert all(torch.isfinite(p).all() for p in params)


def test_reconfigure_rejects_bad_values_and_changes_nothing():
    params, grads, opt = _setup()
    _steps(opt, params, grads[:2])
    before = opt.state[params[0]]["window_indices"].clone()
    with pytest.raises(ValueError, match="density"):
        opt.reconfigure(density=2.0)
    assert torch.equal(before, opt.state[params[0]]["window_indices"]) and opt.param_groups[0]["density"] == 0.1


def test_fallback_to_adamw_continues_exactly_as_torch_adamw():
    params, grads, opt = _setup()
    _steps(opt, params, grads[:8])
    opt.fallback_to_adamw()
    assert all(set(opt.state[p]) == {"step", "numel", "exp_avg", "exp_avg_sq"} for p in params)
    assert state_bytes(opt) == 8 * sum(p.numel() for p in params)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    adamw = torch.optim.AdamW(twins, lr=KW["lr"], weight_decay=0.0, foreach=False)
    adamw.load_state_dict(
        {
            "state": {
                i: {
                    "step": torch.tensor(float(opt.state[p]["step"])),
                    "exp_avg": opt.state[p]["exp_avg"].clone(),
                    "exp_avg_sq": opt.state[p]["exp_avg_sq"].clone(),
                }
                for i, p in enumerate(params)
            },
            "param_groups": adamw.state_dict()["param_groups"],
        }
    )
    _steps(opt, params, grads[8:])
    _steps(adamw, twins, grads[8:])
    for a, b in zip(params, twins):
        assert_close(a.detach(), b.detach())


def test_fallback_state_survives_a_checkpoint():
    params, grads, opt = _setup()
    _steps(opt, params, grads[:5])
    opt.fallback_to_adamw()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = MicroAdam(twins, **KW)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.param_groups[0]["dense"] is True
    _steps(opt, params, grads[5:])
    _steps(fresh, twins, grads[5:])
    assert all(torch.equal(a, b) for a, b in zip(params, twins))


def test_error_feedback_norm_matches_the_reference():
    gen = torch.Generator().manual_seed(2)
    p = torch.nn.Parameter(torch.randn(1000, generator=gen, dtype=torch.float64))
    shadow = p.detach().clone()
    opt = MicroAdam([p], **KW)
    ref = ReferenceMicroAdam([shadow], **{k: v for k, v in KW.items()})
    for _ in range(5):
        g = torch.randn(1000, generator=gen, dtype=torch.float64)
        p.grad = g.clone()
        opt.step()
        ref.step([g])
    norm, count = opt.error_feedback_norm()
    assert count == 1000
    assert norm == pytest.approx(ref.dequantized_error(0).norm().item(), rel=1e-6)
