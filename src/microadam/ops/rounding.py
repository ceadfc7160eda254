"""Rounding of updated parameter values into the parameter's dtype."""

from __future__ import annotations

import torch

__all__ = ["round_to_dtype"]


def round_to_dtype(x: torch.Tensor, dtype: torch.dtype, random_bits: torch.Tensor | None) -> torch.Tensor:
    """Round float32/float64 ``x`` to ``dtype``.

    With ``random_bits`` (int64, one per element) and ``dtype == bfloat16``,
    rounding is stochastic: the low 16 bits of the float32 pattern are raised
    by 16 random bits and cut off, so ``x`` rounds up with probability equal to
    its distance from the lower neighbour (unbiased). Otherwise, round to
    nearest even.
    """
    if random_bits is None or dtype != torch.bfloat16:
        return x.to(dtype)
    bits = x.to(torch.float32).view(torch.int32).to(torch.int64)
    # Adding to the two's-complement value adds to the bit pattern (the sign
    # bit is untouched for finite values), so negative values round away from
    # zero with the same probability law; clearing 16 bits then truncates.
    bits = (bits + (random_bits & 0xFFFF)) & ~0xFFFF
    return bits.to(torch.int32).view(torch.float32).to(torch.bfloat16)
