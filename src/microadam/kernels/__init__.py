"""Fast implementations of one MicroAdam step, selected with ``MicroAdam(impl=...)``.

Every implementation has the signature of :func:`microadam.functional.microadam_step` (minus
``impl``), updates the state tensors in place, and is tested against the vectorized torch path
and the float64 reference. Modules are imported only when asked for, so ``import microadam`` never
needs Triton or a compiler.

- ``"torch"``: the vectorized PyTorch path (any device); always available.
- ``"triton"``: fused Triton kernels for CUDA tensors (``microadam.kernels.triton_kernels``).
- ``"cpp"``: a C++/OpenMP extension for CPU tensors, compiled on first use
  (``microadam.kernels.cpu``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

__all__ = ["KERNELS", "load", "load_multi", "availability", "resolve_impl"]

# name -> (module, step function, availability function, many-tensor step function or "")
KERNELS: dict[str, tuple[str, str, str, str]] = {
    "triton": ("microadam.kernels.triton_kernels", "microadam_step_triton", "available", "microadam_step_triton_multi"),
    "cpp": ("microadam.kernels.cpu", "microadam_step_cpp", "available", ""),
}


def availability(name: str) -> tuple[bool, str]:
    """``(True, "")`` if implementation ``name`` can run here, else ``(False, why and how to fix)``."""
    module, _, check, _ = KERNELS[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        return False, f"impl={name!r} cannot be imported ({e})"
    return getattr(mod, check)()


def load(name: str) -> Callable[..., None]:
    """The step function of implementation ``name``; raises ``RuntimeError`` saying why it is unavailable."""
    ok, why = availability(name)
    if not ok:
        raise RuntimeError(why)
    module, fn, _, _ = KERNELS[name]
    return getattr(importlib.import_module(module), fn)


def load_multi(name: str) -> Callable[..., None] | None:
    """The many-tensor step function of ``name`` (one call for a list of per-tensor argument dicts), or None."""
    module, _, _, multi = KERNELS[name]
    if not multi:
        return None
    load(name)  # raises with the reason if unavailable
    return getattr(importlib.import_module(module), multi)


def resolve_impl(impl: str | None, param: torch.Tensor) -> str:
    """The implementation that steps ``param``: ``impl`` itself, or for ``None`` the automatic rule.

    The rule (``MicroAdam(impl=None)``): ``"torch"``, the vectorized path, on every device.
    """
    if impl is not None:
        return impl
    return "torch"
