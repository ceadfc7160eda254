"""The fast path equals the slow reference over 50 steps: every config x dtype x edge-case shape."""

from __future__ import annotations

import zlib

import pytest
import torch

from microadam import MicroAdam
from tests.common import (
    CONFIGS,
    DTYPES,
    Config,
    assert_close,
    assert_state_matches_reference,
    ids,
    make_param,
    reference_for,
    shapes_for,
)

STEPS = 50


def _run(config: Config, dtype: torch.dtype, steps: int = STEPS, none_every: int = 0) -> None:
    # crc32, not hash(): Python salts str hashes per process, and a failure must be reproducible.
    gen = torch.Generator().manual_seed(zlib.crc32(f"{config.id}/{dtype}".encode()))
    shapes = shapes_for(config)
    init = [make_param(s, t, dtype, gen) for s, t in shapes]
    fast = [torch.nn.Parameter(x.clone() if not t else x) for x, (_, t) in zip(init, shapes)]
    for f, (_, t) in zip(fast, shapes):
        if t and f.numel() > 1:
            assert not f.is_contiguous()
    slow = [x.detach().clone() for x in init]
    opt = MicroAdam(fast, **config.kwargs)
    ref = reference_for(slow, config.kwargs, dtype)
    for step in range(steps):
        grads = []
        for i, f in enumerate(fast):
            # Every `none_every`-th step, parameter i skips (grad None): state untouched.
            if none_every and (step + i) % none_every == 0:
                grads.append(None)
            else:
                grads.append(torch.randn(f.shape, generator=gen, dtype=torch.float64).to(dtype))
        for f, g in zip(fast, grads):
            f.grad = None if g is None else g.clone()
        opt.step()
        ref.step([None if g is None else g.clone() for g in grads])
    for i, (f, s) in enumerate(zip(fast, slow)):
        assert f.dtype == dtype and f.shape == s.shape
        assert_close(f.detach(), s, dtype)
        assert_state_matches_reference(opt, f, ref, i)


# Every config in the dtypes models train in by default; float64 and float16 in CI's slow pass.
DEFAULT_DTYPES = (torch.float32, torch.bfloat16)


# The longest configs (9-11 s a row on 2 cores) run in CI's slow pass: the default suite took 586 of
# its 600 s in the fresh-clone CI of 2026-12-01 20:06 UTC, and 612 s at 23:14 UTC; with the tests of
# 2026-12-02, 639 s locally beside other work. Odd layouts under release stay in the default suite
# through the fuzz runs and the C++ and Triton equivalence tables.
SLOW_CONFIGS = {"odd-blocks-chunked", "odd-blocks", "release-half-odd-chunked"}


@pytest.mark.parametrize(
    "dtype", [pytest.param(d, marks=() if d in DEFAULT_DTYPES else pytest.mark.slow) for d in DTYPES], ids=str
)
@pytest.mark.parametrize(
    "config", [pytest.param(c, id=c.id, marks=pytest.mark.slow if c.id in SLOW_CONFIGS else ()) for c in CONFIGS]
)
def test_fast_path_equals_reference(config: Config, dtype: torch.dtype) -> None:
    _run(config, dtype)


@pytest.mark.parametrize("config", ids(CONFIGS[:2]))
def test_none_grads_leave_parameter_and_state_alone(config: Config) -> None:
    _run(config, torch.float32, steps=20, none_every=3)


def test_tied_parameters_follow_reference() -> None:
    """A weight shared by two modules appears once; its accumulated gradient drives one update."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 16)
    head = torch.nn.Linear(16, 50, bias=False)
    head.weight = emb.weight  # tied
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    params = list(model.parameters())
    assert len(params) == 1
    kwargs = dict(lr=1e-2, window=3, density=0.1, block_size=64, quant_block_size=16)
    shadow = params[0].detach().clone()
    opt = MicroAdam(params, **kwargs)
    ref = reference_for([shadow], kwargs, torch.float32)
    for _ in range(20):
        opt.zero_grad()
        x = torch.randint(0, 50, (8,))
        loss = model["head"](model["emb"](x)).logsumexp(-1).mean()
        loss.backward()
        ref.step([params[0].grad.clone()])
        opt.step()
        assert_close(params[0].detach(), shadow, torch.float32)
    assert_state_matches_reference(opt, params[0], ref, 0)


def test_param_groups_with_different_hyperparameters() -> None:
    gen = torch.Generator().manual_seed(3)
    a = torch.nn.Parameter(torch.randn(300, generator=gen))
    b = torch.nn.Parameter(torch.randn(10, 13, generator=gen))
    ga = dict(lr=1e-2, window=3, density=0.1, block_size=32, quant_block_size=8, weight_decay=0.1)
    gb = dict(lr=3e-3, betas=(0.8, 0.99), window=5, density=0.3, block_size=16, quant_block_size=16, eps=1e-6)
    opt = MicroAdam([dict(params=[a], **ga), dict(params=[b], **gb)], lr=1.0)
    sa, sb = a.detach().clone(), b.detach().clone()
    ra = reference_for([sa], ga, torch.float32, param_indices=[0])
    rb = reference_for([sb], gb, torch.float32, param_indices=[1])
    for _ in range(50):
        g1, g2 = torch.randn(300, generator=gen), torch.randn(10, 13, generator=gen)
        a.grad, b.grad = g1.clone(), g2.clone()
        opt.step()
        ra.step([g1])
        rb.step([g2])
    assert_close(a.detach(), sa)
    assert_close(b.detach(), sb)
    assert opt.state[a]["window_indices"].shape[0] == 3
    assert opt.state[b]["window_indices"].shape[0] == 5
