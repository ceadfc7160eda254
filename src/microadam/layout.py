"""How one parameter tensor is cut into Top-K blocks and quantization blocks.

This is part of the state format: the optimizer, the reference, the memory
accounting and checkpoint validation all derive shapes from here, and the
numbers depend only on the user's arguments and the tensor's size (never on
the device, unlike the authors' CUDA code, whose block size follows the GPU).
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass

__all__ = ["Layout", "layout_for", "k_per_block", "MAX_BLOCK_SIZE"]

# Block-relative indices are stored as int16: a block may hold at most 2**15
# elements so that every index in [0, block) is representable.
MAX_BLOCK_SIZE = 2**15


def k_per_block(block: int, density: float) -> int:
    """Entries kept per Top-K block: ``ceil(block * density)``, at least 1.

    ``block * density`` is rounded to 9 decimals first so that binary
    floating-point noise (``100 * 0.07 == 7.000000000000001``) does not add an
    entry.
    """
    if block <= 0:
        return 1
    return max(1, min(block, math.ceil(round(block * density, 9))))


@dataclass(frozen=True)
class Layout:
    """Shapes of the MicroAdam state of one tensor with ``numel`` elements.

    Attributes:
        numel: elements of the parameter (d).
        block: Top-K block size actually used, ``min(block_size, numel)``
            (``1`` for an empty tensor), so a small tensor is one block.
        k: entries kept per Top-K block.
        num_blocks: ``ceil(numel / block)``; the last block may be partial.
        quant_block: quantization block size q.
        num_quant_blocks: ``ceil(numel / q)``.
        window: ring slots m.
    """

    numel: int
    block: int
    k: int
    num_blocks: int
    quant_block: int
    num_quant_blocks: int
    window: int

    @property
    def state_bytes(self) -> int:
        """Exact bytes of MicroAdam state for this tensor (see ``docs/algorithm.md``).

        int16 indices and bf16 values for ``window * num_blocks * k`` entries,
        4-bit codes packed two per byte, bf16 (lo, hi) per quantization block.
        The step counter is a Python int and not counted.
        """
        window_entries = self.window * self.num_blocks * self.k
        return window_entries * (2 + 2) + (self.numel + 1) // 2 + self.num_quant_blocks * 2 * 2


def layout_for(numel: int, *, block_size: int, density: float, quant_block_size: int, window: int) -> Layout:
    """Derive the :class:`Layout` of a tensor of ``numel`` elements (cached: asked once per tensor and step)."""
    # Plain Python numbers as the cache key (and in the Layout): a NumPy integer would otherwise be
    # cached and handed back to callers that passed an int.
    return _layout_for(
        _integer("numel", numel),
        _integer("block_size", block_size),
        float(density),
        _integer("quant_block_size", quant_block_size),
        _integer("window", window),
    )


def _integer(name: str, value: object) -> int:
    """``value`` as a plain int (an int or a NumPy integer); a float or anything else is refused."""
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"layout_for: {name} must be an integer, got {value!r}") from None


@functools.lru_cache(maxsize=4096)
def _layout_for(numel: int, block_size: int, density: float, quant_block_size: int, window: int) -> Layout:
    for name, value in (("block_size", block_size), ("quant_block_size", quant_block_size), ("window", window)):
        if value < 1:
            raise ValueError(f"layout_for: {name} must be >= 1, got {value}")
    if numel < 0:
        raise ValueError(f"layout_for: numel must be >= 0, got {numel}")
    block = min(block_size, numel) if numel > 0 else 1
    if block > MAX_BLOCK_SIZE:
        # MicroAdam's constructor refuses such a block_size, but the functional API and the kernels take a
        # Layout as given: a block-relative index >= 2**15 would wrap negative in the int16 window and the
        # torch path would then move an element of the previous block instead (silently).
        raise ValueError(
            f"layout_for: a Top-K block of {block} elements (block_size={block_size}, numel={numel}) is over "
            f"{MAX_BLOCK_SIZE}: its block-relative indices would not fit in the int16 window"
        )
    return Layout(
        numel=numel,
        block=block,
        k=k_per_block(block, density),
        num_blocks=-(-numel // block),
        quant_block=quant_block_size,
        num_quant_blocks=-(-numel // quant_block_size),
        window=window,
    )
