"""Counter-based random bits for stochastic rounding.

Random bits are a hash of (seed, parameter index, step, stream, element
position), not draws from a generator. Three things follow: a resumed run gets
the same bits as an uninterrupted one without saving any RNG state; an element
that appears twice in a sparse update gets the same bits both times, so
duplicate writes agree; and a Triton kernel can produce the same bits from the
same integers. The hash is a 32-bit integer mixer computed in int64 with masks
(multipliers below 2**27 keep every product below 2**63, so nothing overflows).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["hash_bits", "stream_key"]

_MASK32 = 0xFFFFFFFF
_MUL = 0x045D9F3B

# Streams keep the error-feedback and parameter roundings independent.
STREAM_ERROR = 1
STREAM_PARAM = 2
# The Triton kernels' second rounding of a low-precision parameter under release: the compress
# kernel rounds the dense move into it with STREAM_PARAM, the update kernel again at the window's
# positions with this one.
STREAM_MOVE = 3


def _mix32_int(x: int) -> int:
    x &= _MASK32
    x ^= x >> 16
    x = (x * _MUL) & _MASK32
    x ^= x >> 16
    x = (x * _MUL) & _MASK32
    x ^= x >> 16
    return x


def stream_key(seed: int, param_index: int, step: int, stream: int) -> int:
    """A 32-bit key for one (seed, parameter, step, stream)."""
    key = _mix32_int(_param_key(seed, param_index) ^ _mix32_cached(step))
    return _mix32_int(key ^ _mix32_cached(stream))


# stream_key runs twice per tensor and step in pure Python: the parts that repeat (a tensor's key
# before the step, the step's and the stream's mix) are cached.
@functools.lru_cache(maxsize=4096)
def _param_key(seed: int, param_index: int) -> int:
    return _mix32_int(_mix32_int(seed) ^ _mix32_int(param_index))


@functools.lru_cache(maxsize=256)
def _mix32_cached(x: int) -> int:
    return _mix32_int(x)


def hash_bits(positions: torch.Tensor, key: int) -> torch.Tensor:
    """32 random bits (as int64 in ``[0, 2**32)``) for each element position."""
    x = (positions.to(torch.int64) + key) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _MUL) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _MUL) & _MASK32
    x = x ^ (x >> 16)
    return x
