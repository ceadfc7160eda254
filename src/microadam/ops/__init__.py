"""Pure-PyTorch building blocks of a MicroAdam step (CPU and CUDA).

Each function works on one chunk of one flattened tensor and is tested on its
own against a brute-force definition (``tests/test_ops.py``); the Triton kernels
of the fast-path issue keep the same semantics.
"""

from microadam.ops.quant import (
    bf16_ceil,
    bf16_floor,
    dequantize_blocks,
    pack_nibbles,
    quantize_blocks,
    unpack_nibbles,
)
from microadam.ops.random import hash_bits, stream_key
from microadam.ops.rounding import round_to_dtype
from microadam.ops.topk import block_topk

__all__ = [
    "bf16_ceil",
    "bf16_floor",
    "block_topk",
    "dequantize_blocks",
    "hash_bits",
    "pack_nibbles",
    "quantize_blocks",
    "round_to_dtype",
    "stream_key",
    "unpack_nibbles",
]
