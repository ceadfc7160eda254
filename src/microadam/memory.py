"""Bytes of optimizer state, measured the same way for any torch optimizer."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["state_bytes", "tensor_bytes"]


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor's data takes on this process.

    Quantized tensor subclasses (torchao's 8-bit/4-bit optimizer state) report
    the logical shape and dtype of the full-precision tensor they stand for;
    their real storage is in the inner tensors named by ``__tensor_flatten__``,
    which are counted instead. A DTensor counts its local shard only.
    """
    local = getattr(t, "to_local", None)
    if callable(local) and type(t).__name__ == "DTensor":
        return tensor_bytes(local())
    flatten = getattr(t, "__tensor_flatten__", None)
    if callable(flatten) and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        names, _ = flatten()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def _walk(value: Any, seen: set[int], depth: int = 0) -> int:
    if depth > 6:
        return 0
    if isinstance(value, torch.Tensor):
        if id(value) in seen:
            return 0
        seen.add(id(value))
        return tensor_bytes(value)
    if isinstance(value, dict):
        return sum(_walk(v, seen, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_walk(v, seen, depth + 1) for v in value)
    # Objects holding tensors, e.g. GaLore's projector with its ortho matrix.
    attrs = getattr(value, "__dict__", None)
    if attrs and not isinstance(value, type):
        return sum(_walk(v, seen, depth + 1) for v in attrs.values())
    return 0


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Total bytes of every tensor in ``optimizer.state``, for any torch optimizer.

    Counts tensors nested in dicts, lists and plain objects, each once; the
    inner storage of quantized tensor subclasses; the local shard of DTensors.
    Parameters and gradients are not counted (they are not in the state).

    Example:
        >>> import torch, microadam
        >>> p = torch.nn.Parameter(torch.zeros(1000))
        >>> opt = torch.optim.AdamW([p])
        >>> p.grad = torch.ones(1000); opt.step()
        >>> microadam.state_bytes(opt)  # exp_avg + exp_avg_sq in fp32, step
        8004
    """
    seen: set[int] = set()
    return sum(_walk(s, seen) for s in optimizer.state.values())
