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

__all__ = ["KERNELS", "load", "availability"]

# name -> (module, step function, availability function)
KERNELS: dict[str, tuple[str, str, str]] = {
    "triton": ("microadam.kernels.triton_kernels", "microadam_step_triton", "available"),
    "cpp": ("microadam.kernels.cpu", "microadam_step_cpp", "available"),
}


def availability(name: str) -> tuple[bool, str]:
    """``(True, "")`` if implementation ``name`` can run here, else ``(False, why and how to fix)``."""
    module, _, check = KERNELS[name]
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
    module, fn, _ = KERNELS[name]
    return getattr(importlib.import_module(module), fn)
