"""The building blocks, checked against brute-force definitions, and the paper's assumptions as properties."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from microadam.functional import microadam_step, step_scalars, zero_state
from microadam.layout import k_per_block, layout_for
from microadam.ops import (
    bf16_ceil,
    bf16_floor,
    block_topk,
    dequantize_blocks,
    hash_bits,
    pack_nibbles,
    quantize_blocks,
    round_to_dtype,
    stream_key,
    unpack_nibbles,
)


def _brute_topk(row: torch.Tensor, k: int) -> list[int]:
    order = sorted(range(row.numel()), key=lambda i: (-float(row[i]), i))
    return sorted(order[:k])


@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 80),
    k_frac=st.floats(0.01, 1.0),
    levels=st.sampled_from([3, 50, 10**6]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_block_topk_matches_brute_force_with_ties(rows, cols, k_frac, levels, dtype, seed):
    """Few distinct levels force ties at the k-th place; the lower index must win."""
    gen = torch.Generator().manual_seed(seed)
    mag = torch.randint(0, levels, (rows, cols), generator=gen).to(dtype)
    k = max(1, min(cols, math.ceil(cols * k_frac)))
    got = block_topk(mag, k)
    assert got.shape == (rows, k)
    for r in range(rows):
        assert got[r].tolist() == _brute_topk(mag[r], k)


def test_block_topk_takes_padding_last():
    mag = torch.tensor([[0.0, 0.0, -1.0, -1.0], [3.0, -1.0, -1.0, -1.0]])
    assert block_topk(mag, 3).tolist() == [[0, 1, 2], [0, 1, 2]]


@given(
    d=st.integers(1, 3000),
    block=st.sampled_from([1, 7, 64, 100, 4096]),
    density=st.floats(0.001, 1.0),
    seed=st.integers(0, 2**16),
)
def test_block_topk_is_contractive(d, block, density, seed):
    """||C(x) - x||^2 <= (1 - k/B) ||x||^2: the sparsifier the convergence proof needs."""
    x = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    lay = layout_for(d, block_size=block, density=density, quant_block_size=1, window=1)
    padded = torch.cat([x, x.new_zeros(lay.num_blocks * lay.block - d)]).view(lay.num_blocks, lay.block)
    mag = padded.abs()
    mag.view(-1)[d:] = -1
    idx = block_topk(mag, lay.k)
    kept = torch.zeros_like(padded).scatter_(1, idx, padded.gather(1, idx)).view(-1)[:d]
    assert (kept - x).square().sum() <= (1 - lay.k / lay.block) * x.square().sum() * (1 + 1e-12) + 1e-300


@given(
    blocks=st.integers(1, 5),
    q=st.integers(1, 70),
    scale=st.floats(1e-30, 1e30),
    seed=st.integers(0, 2**16),
)
def test_nearest_rounding_error_is_within_a_thirtieth_of_the_range(blocks, q, scale, seed):
    x = torch.randn(blocks, q, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    codes, lo, hi = quantize_blocks(x, None)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    lo64, hi64 = lo.double(), hi.double()
    assert (lo64 <= x.amin(1)).all() and (hi64 >= x.amax(1)).all(), "stored range must cover the block"
    err = (dequantize_blocks(codes, lo, hi, torch.float64) - x).abs()
    bound = (hi64 - lo64) / 30
    assert (err <= bound[:, None] * (1 + 1e-9) + 1e-300).all()


def test_constant_block_has_zero_scale_and_exact_value():
    x = torch.full((2, 8), 0.75, dtype=torch.float32)
    x[1] = 0.0
    codes, lo, hi = quantize_blocks(x, None)
    assert (codes == 0).all()
    assert torch.equal(dequantize_blocks(codes, lo, hi, torch.float32), x)


def test_stochastic_rounding_of_codes_is_unbiased():
    """Mean of many independent stochastic quantizations converges to x (fixed seed)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, generator=gen, dtype=torch.float64)
    pos = torch.arange(x.numel())
    trials = 4000
    total = torch.zeros_like(x)
    for t in range(trials):
        u = (hash_bits(pos, stream_key(0, 0, t, 1)) >> 8).double().view_as(x) * 2.0**-24
        codes, lo, hi = quantize_blocks(x, u)
        total += dequantize_blocks(codes, lo, hi, torch.float64)
    mean = total / trials
    _, lo, hi = quantize_blocks(x, None)
    step = ((hi.double() - lo.double()) / 15)[:, None]
    # Each draw errs by at most one level with variance <= step^2 / 4: 5 sigma of the mean.
    assert ((mean - x).abs() <= 5 * step / 2 / math.sqrt(trials)).all()
    # Nearest rounding is biased on the same data: the test can tell the two apart.
    codes_n, lo_n, hi_n = quantize_blocks(x, None)
    bias_nearest = (dequantize_blocks(codes_n, lo_n, hi_n, torch.float64) - x).abs().mean()
    assert (mean - x).abs().mean() < bias_nearest / 5


@given(values=st.lists(st.floats(-1e30, 1e30, allow_nan=False), min_size=1, max_size=50))
def test_bf16_floor_and_ceil_are_directed(values):
    x = torch.tensor(values, dtype=torch.float64)
    lo, hi = bf16_floor(x), bf16_ceil(x)
    assert lo.dtype == hi.dtype == torch.bfloat16
    assert (lo.double() <= x).all() and (hi.double() >= x).all()
    # Tight: the next bf16 value beyond each bound crosses x.
    up = torch.nextafter(lo, torch.full_like(lo, float("inf"))).double()
    down = torch.nextafter(hi, torch.full_like(hi, -float("inf"))).double()
    assert (up > x).all() and (down < x).all()


@given(codes=st.lists(st.integers(0, 15), min_size=0, max_size=99))
def test_pack_unpack_roundtrip(codes):
    c = torch.tensor(codes, dtype=torch.uint8)
    packed = pack_nibbles(c)
    assert packed.numel() == (len(codes) + 1) // 2
    assert torch.equal(unpack_nibbles(packed, len(codes)), c)


def test_stochastic_bf16_rounding_is_unbiased_and_brackets():
    x = torch.tensor([1.0 + 2**-9, -3.0 - 2**-8, 1e-3 / 3], dtype=torch.float32).repeat(20000)
    bits = hash_bits(torch.arange(x.numel()), stream_key(1, 2, 3, 2))
    y = round_to_dtype(x, torch.bfloat16, bits).float().view(20000, 3)
    lo, hi = bf16_floor(x[:3]).float(), bf16_ceil(x[:3]).float()
    assert ((y >= lo) & (y <= hi)).all()
    expected = x[:3]
    sigma = (hi - lo) / 2 / math.sqrt(20000)
    assert ((y.mean(0) - expected).abs() <= 5 * sigma).all()
    # Without random bits: nearest.
    assert torch.equal(round_to_dtype(x[:3], torch.bfloat16, None), x[:3].to(torch.bfloat16))


def test_hash_bits_are_deterministic_and_spread():
    pos = torch.arange(100000)
    a, b = hash_bits(pos, 12345), hash_bits(pos, 12345)
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() < 2**32
    u = a.double() / 2**32
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    assert stream_key(0, 0, 1, 1) != stream_key(0, 0, 2, 1) != stream_key(0, 1, 1, 1)


def test_stream_key_is_the_chained_mix_whatever_it_caches():
    """stream_key caches its partial mixes; the keys must stay the documented chain (checkpoints
    resumed across versions draw the same random bits)."""
    from microadam.ops.random import _mix32_int

    def plain(seed: int, param_index: int, step: int, stream: int) -> int:
        key = _mix32_int(seed)
        for part in (param_index, step, stream):
            key = _mix32_int(key ^ _mix32_int(part))
        return key

    for args in [(0, 0, 1, 1), (7, 3, 12345, 2), (2**31, 999, 1, 3), (5, 0, 2**33, 1)]:
        assert stream_key(*args) == plain(*args) == stream_key(*args)
    assert stream_key(0, 0, 1, 1) == 719101965  # fixed: a change here changes every run's random bits


def test_k_per_block_avoids_float_noise():
    assert k_per_block(100, 0.07) == 7  # 100 * 0.07 == 7.000000000000001
    assert k_per_block(4096, 0.01) == 41
    assert k_per_block(5, 0.01) == 1
    assert k_per_block(64, 1.0) == 64


def test_layout_for_takes_numpy_integers_and_refuses_floats():
    np = pytest.importorskip("numpy")
    a = layout_for(np.int64(1000), block_size=64, density=0.05, quant_block_size=16, window=3)
    b = layout_for(1000, block_size=64, density=0.05, quant_block_size=16, window=3)
    assert a == b and type(a.numel) is int  # cached layouts hold plain ints whatever was passed
    with pytest.raises(TypeError, match="window must be an integer, got 2.5"):
        layout_for(1000, block_size=64, density=0.05, quant_block_size=16, window=2.5)


def test_layout_for_refuses_a_block_whose_indices_overflow_int16():
    """The window stores block-relative indices as int16: a Top-K block over 2**15 elements would wrap
    index 39000 to -26536, and the torch path would then update an element of the previous block."""
    with pytest.raises(ValueError, match="40000 elements.*int16"):
        layout_for(80000, block_size=40000, density=0.001, quant_block_size=128, window=2)
    # The limit is on the block actually used: a small tensor is one block whatever block_size says.
    assert layout_for(1000, block_size=2**20, density=0.01, quant_block_size=128, window=2).block == 1000
    assert layout_for(2**16, block_size=2**15, density=0.01, quant_block_size=128, window=2).block == 2**15
    for bad in (dict(block_size=0), dict(quant_block_size=0), dict(window=0)):
        kw = dict(block_size=64, density=0.05, quant_block_size=16, window=3) | bad
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be >= 1"):
            layout_for(1000, **kw)


@pytest.mark.parametrize("sizes", [(100, 100), (50, 100), (100, 50)])
def test_torch_step_refuses_tensors_of_another_size_than_the_layout(sizes):
    """impl="torch" sliced by layout.numel: a larger parameter had only its first elements stepped, silently."""
    lay = layout_for(50, block_size=64, density=0.05, quant_block_size=16, window=2)
    p, g = torch.zeros(sizes[0]), torch.ones(sizes[1])
    state = zero_state(lay, "cpu")
    with pytest.raises(ValueError, match="must both have layout.numel = 50"):
        microadam_step(
            p, g, **state, layout=lay, step=1, lr=1.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
            error_rounding="nearest", stochastic_param_rounding=False, seed=0, param_index=0, impl="torch",
        )  # fmt: skip
    assert not p.any() and all(not t.any() for t in state.values()), "nothing may be written"


def test_step_scalars_read_a_tensor_lr_when_called():
    """step_scalars caches per step; a tensor lr changed in place must not hit a stale entry."""
    lr = torch.tensor(0.1)
    kw = dict(step=1, window=3, beta1=0.9, beta2=0.99, weight_decay=0.5, seed=0, param_index=0)
    first = step_scalars(lr=lr, **kw).decay
    lr.fill_(0.2)
    assert step_scalars(lr=lr, **kw).decay == pytest.approx(1 - 0.2 * 0.5) != first


def test_step_scalars_without_keys_differ_only_in_keys():
    """keys=False (a caller that rounds nothing stochastically) skips the two hashes, nothing else."""
    kw = dict(step=7, window=3, beta1=0.9, beta2=0.99, lr=1e-3, weight_decay=0.1, seed=5, param_index=2, release=0.5)
    full, bare = step_scalars(**kw), step_scalars(keys=False, **kw)
    assert (bare.err_key, bare.par_key) == (0, 0) != (full.err_key, full.par_key)
    assert dataclasses.replace(full, err_key=0, par_key=0) == bare


@pytest.mark.parametrize("step", [0, -3])
def test_step_scalars_refuse_a_step_before_the_first(step):
    """The step is 1-based (already incremented): 0 would divide by zero in the bias corrections."""
    kw = dict(window=3, beta1=0.9, beta2=0.99, lr=1e-3, weight_decay=0.0, seed=0, param_index=0)
    with pytest.raises(ValueError, match=rf"step must be >= 1 .*got {step}"):
        step_scalars(step=step, **kw)
