"""4-bit block quantization of the error feedback, packed two codes per byte.

Per block of q elements: ``lo = min``, ``hi = max``, stored as bf16 rounded
outward (``lo`` down, ``hi`` up) so that every element lies in the stored
range and the nearest-rounding error stays within ``(hi - lo) / 30``;
``code = floor((a - lo) / scale + r)`` with ``scale = (hi - lo) / 15`` and
``r = 0.5`` (nearest) or uniform in [0, 1) (stochastic, unbiased). A block with
``hi == lo`` has ``scale == 0`` and all codes 0 (the reference code divides by
zero there).
"""

from __future__ import annotations

import torch

__all__ = [
    "bf16_floor",
    "bf16_ceil",
    "quantize_blocks",
    "dequantize_blocks",
    "pack_nibbles",
    "unpack_nibbles",
    "RELEASE_RMS_FLOOR",
]

LEVELS = 15

# Released error feedback (``release`` > 0) moves a quantization block by its residual rescaled to an
# RMS of ``release_scale``; a block whose residual is all zero does not move. The quantization bounds
# (bf16_floor / bf16_ceil below) are rounded outward to bf16, so they never fall below bf16's smallest
# subnormal (9.2e-41): a residual whose gradient stopped decays to that and stays. In float32 its
# squares underflow and the RMS is 0; in float64 (a float64 parameter's compute dtype) they do not, and
# the block was moved by lr * release_scale every step, forever. So an RMS below float32's smallest
# normal counts as all zero: in float32, where an RMS is 0 or at least sqrt(2**-149) ~ 4e-23, this
# changes nothing.
RELEASE_RMS_FLOOR = torch.finfo(torch.float32).tiny


def bf16_floor(x: torch.Tensor) -> torch.Tensor:
    """The largest bfloat16 value ``<= x`` (elementwise)."""
    y = x.to(torch.bfloat16)
    over = y.to(x.dtype) > x
    return torch.where(over, torch.nextafter(y, torch.full_like(y, -float("inf"))), y)


def bf16_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 value ``>= x`` (elementwise)."""
    y = x.to(torch.bfloat16)
    under = y.to(x.dtype) < x
    return torch.where(under, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


def _scale(lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (hi.to(dtype) - lo.to(dtype)) / LEVELS


def _plus_zero(x: torch.Tensor) -> torch.Tensor:
    """``x`` with -0 made +0. Which zero the min or max of a block holding both gives depends on the
    order of the comparisons, which differs between amin's vector lanes, the C++ path's and the
    Triton kernels' reductions (release halves a negative subnormal to -0): the bounds take +0, so
    that the state is bit-identical in every path."""
    return torch.where(x == 0, torch.zeros_like(x), x)


def quantize_blocks(a: torch.Tensor, uniform: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize each row of ``a`` (``[blocks, q]``) to 4-bit codes.

    Args:
        a: values; a partial last block must be padded with one of its own
            values so that min and max are unchanged.
        uniform: ``None`` for round-to-nearest, or uniforms in [0, 1) shaped like ``a``.

    Returns:
        ``(codes uint8 [blocks, q], lo bf16 [blocks], hi bf16 [blocks])``.
    """
    lo = bf16_floor(_plus_zero(a.amin(dim=1)))
    hi = bf16_ceil(_plus_zero(a.amax(dim=1)))
    scale = _scale(lo, hi, a.dtype)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    x = (a - lo.to(a.dtype)[:, None]) / safe[:, None]
    x = x + (0.5 if uniform is None else uniform)
    codes = x.floor_().clamp_(0, LEVELS)
    codes = torch.where((scale > 0)[:, None], codes, torch.zeros_like(codes))
    return codes.to(torch.uint8), lo, hi


def dequantize_blocks(codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``lo + code * scale`` for codes ``[blocks, q]``, in ``dtype``."""
    scale = _scale(lo, hi, dtype)
    return codes.to(dtype) * scale[:, None] + lo.to(dtype)[:, None]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack a flat uint8 tensor of 4-bit codes two per byte (even index in the low nibble).

    An odd count gets a zero high nibble in the last byte.
    """
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: the first ``count`` codes."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=1).view(-1)[:count]
