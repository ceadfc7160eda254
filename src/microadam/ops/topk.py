"""Exact block Top-K by magnitude with a fixed tie rule.

Rule: in each row, keep the ``k`` entries of largest magnitude; among equal
magnitudes the lower index wins. The rule makes the selection a function of the
data alone (``torch.topk`` leaves ties unspecified, and they are common: a bf16
gradient has 8 significant bits, so at step 1, before any error feedback, equal
magnitudes at the k-th place are the norm rather than the exception). The
reference, this op and the Triton kernel all follow it, so they can be compared
bit for bit.
"""

from __future__ import annotations

import torch

__all__ = ["block_topk"]

# Indices are packed into the low 16 bits of a sort key; layout.MAX_BLOCK_SIZE
# (2**15) keeps every block-relative index below that.
_INDEX_BITS = 16


def _tie_break_topk(mag: torch.Tensor, k: int) -> torch.Tensor:
    """Slow but exact Top-K of rows that have a tie at the k-th place."""
    if mag.dtype == torch.float32:
        # A non-negative float's bit pattern orders like its value, and the
        # padding value -1.0 is negative as int32, so it sorts below every real
        # entry. Appending the reversed index makes every key unique.
        cols = mag.shape[1]
        rev = (cols - 1) - torch.arange(cols, device=mag.device, dtype=torch.int64)
        key = (mag.view(torch.int32).to(torch.int64) << _INDEX_BITS) | rev
        return key.topk(k, dim=1, sorted=False).indices
    # float64 (the testing dtype) has no spare bits: a stable sort keeps equal
    # magnitudes in index order.
    return torch.sort(mag, dim=1, descending=True, stable=True).indices[:, :k]


def block_topk(mag: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of each row of ``mag``, ascending.

    Args:
        mag: ``[rows, cols]`` magnitudes, float32 or float64. Real entries are
            ``>= 0``; padding entries must be ``-1`` so they are taken last.
        k: entries per row, ``1 <= k <= cols``.

    Returns:
        ``[rows, k]`` int64 column indices, sorted ascending in each row.
    """
    rows, cols = mag.shape
    if k >= cols:
        return torch.arange(cols, device=mag.device).expand(rows, cols).clone()
    # k + 1 values reveal whether the k-th place is tied; most rows are not
    # (fp32 gradients plus error feedback rarely tie) and keep torch.topk's answer.
    vals, idx = mag.topk(k + 1, dim=1, sorted=True)
    idx = idx[:, :k]
    tied = vals[:, k] == vals[:, k - 1]
    if bool(tied.any()):
        # A tie at zero means the row has fewer than k nonzeros (the common case: embedding
        # rows that no token touched): all nonzeros are taken, then zeros by lowest index, then
        # padding by lowest index. A float key says exactly that, without the int64 keys of the
        # general case (3x slower). Keys are integers below 2**24, exact in float32.
        zero_tie = tied & (vals[:, k - 1] <= 0)
        if bool(zero_tie.any()):
            rows_z = zero_tie.nonzero().squeeze(1)
            sub = mag[rows_z]
            rev = (cols - 1) - torch.arange(cols, device=mag.device, dtype=mag.dtype)
            key = torch.where(sub > 0, float(cols), torch.where(sub == 0, rev, -1.0 - cols + rev))
            idx[rows_z] = key.topk(k, dim=1, sorted=False).indices
            tied = tied & ~zero_tie
        if bool(tied.any()):
            rows_t = tied.nonzero().squeeze(1)
            idx[rows_t] = _tie_break_topk(mag[rows_t], k)
    return idx.sort(dim=1).values
