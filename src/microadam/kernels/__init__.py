"""Fast implementations of one MicroAdam step, selected with ``MicroAdam(impl=...)``.

Every implementation has the signature of :func:`microadam.functional.microadam_step` (minus
``impl``), updates the state tensors in place, and is tested against the vectorized torch path
and the float64 reference. Modules are imported only when asked for, so ``import microadam`` never
needs Triton or a compiler.

- ``"torch"``: the vectorized PyTorch path (any device); always available.
- ``"triton"``: fused Triton kernels for CUDA tensors (``microadam.kernels.triton_kernels``).
- ``"cpp"``: a C++/OpenMP extension for CPU tensors, compiled on first use
  (``microadam.kernels.cpu``).

Both fast paths also have a many-tensor entry (``KERNELS``' fourth field): one call for all of a
step's tensors (Triton: one launch per tile class; C++: one parallel region), so a model's many
small tensors do not cost a call each. ``MicroAdam.step`` uses it in its two phases (the last two
fields, :func:`load_phases`): ``prepare`` checks every tensor's arguments and builds what the
call needs, writing nothing; ``run`` steps them. The optimizer prepares before its range
check, whose result a GPU makes the host wait for, so that the host's work overlaps the GPU's.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "KERNELS",
    "PartialStepError",
    "load",
    "load_multi",
    "load_phases",
    "availability",
    "release_tiles",
    "resolve_impl",
    "state_key",
    "TRITON_MAX_K",
    "TRITON_MAX_QUANT_BLOCK",
    "triton_layout_error",
]


class PartialStepError(RuntimeError):
    """A many-tensor step failed for some of its tensors after stepping the others.

    ``failed`` holds the positions (in the call's list) of the tensors that were not stepped; every
    other tensor of the call was, so a caller that counts steps per tensor advances those. Raised by
    :meth:`MicroAdam.step <microadam.MicroAdam.step>`, ``failed`` holds parameter indices instead, in
    ``param_groups`` order.
    """

    def __init__(self, message: str, failed: list[int]) -> None:
        super().__init__(message)
        self.failed = failed


# name -> (module, step function, availability function, many-tensor step function or "", its two
# phases: prepare and run, or "")
KERNELS: dict[str, tuple[str, str, str, str, str, str]] = {
    "triton": (
        "microadam.kernels.triton_kernels",
        "microadam_step_triton",
        "available",
        "microadam_step_triton_multi",
        "prepare_many",
        "run_prepared",
    ),
    "cpp": (
        "microadam.kernels.cpu",
        "microadam_step_cpp",
        "available",
        "microadam_step_cpp_multi",
        "prepare_many",
        "run_prepared",
    ),
}


def prepare_each(prepare: Callable[..., Any], steps: Sequence[Mapping[str, Any]]) -> list[Any]:
    """``[prepare(**item) for item in steps]``, a refused item's error naming it by its ``param_index``
    (the optimizer passes each parameter's position in param_groups order): one call prepares all of
    a step's tensors, and "window_indices must be ... of shape ..." did not say whose state it was."""
    out = []
    for item in steps:
        try:
            out.append(prepare(**item))
        except ValueError as e:
            raise ValueError(f"parameter {item.get('param_index', '?')}: {e}") from None
    return out


def state_key(
    window_indices: torch.Tensor, window_values: torch.Tensor, error_codes: torch.Tensor, error_bounds: torch.Tensor
) -> tuple:
    """The part of a fast path's cached-row fingerprint that the state tensors give: their addresses,
    shapes and dtypes. A row built (and its state checked) for tensors with this key is right for any
    tensors with it: a tensor of another shape or dtype at a reused address gets another key and is
    checked again (the kernels index raw pointers)."""
    return (
        window_indices.data_ptr(),
        window_values.data_ptr(),
        error_codes.data_ptr(),
        error_bounds.data_ptr(),
        window_indices.shape,
        window_values.shape,
        error_codes.shape,
        error_bounds.shape,
        window_indices.dtype,
        window_values.dtype,
        error_codes.dtype,
        error_bounds.dtype,
    )


def availability(name: str) -> tuple[bool, str]:
    """``(True, "")`` if implementation ``name`` can run here, else ``(False, why and how to fix)``."""
    module, _, check, _, _, _ = KERNELS[name]
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
    module, fn, _, _, _, _ = KERNELS[name]
    return getattr(importlib.import_module(module), fn)


def load_multi(name: str) -> Callable[..., None] | None:
    """The many-tensor step function of ``name`` (one call for a list of per-tensor argument dicts), or None."""
    module, _, _, multi, _, _ = KERNELS[name]
    if not multi:
        return None
    load(name)  # raises with the reason if unavailable
    return getattr(importlib.import_module(module), multi)


def load_phases(name: str) -> tuple[Callable[..., list], Callable[[list], None]] | None:
    """``(prepare, run)`` of ``name``'s many-tensor step, or None: ``run(prepare(items))`` is
    ``load_multi(name)(items)``. ``prepare`` checks every item and raises on a bad one before
    anything is written; it writes nothing, so its result may be dropped (a skipped step). ``run``
    steps the prepared items (or raises :class:`PartialStepError` naming those it could not)."""
    module, _, _, _, prepare, run = KERNELS[name]
    if not prepare:
        return None
    load(name)  # raises with the reason if unavailable
    mod = importlib.import_module(module)
    return getattr(mod, prepare), getattr(mod, run)


def release_tiles(block: int, quant_block: int) -> bool:
    """Whether the Triton kernels release error feedback for this layout: a quantization block at most a
    Top-K block (a tile row), or both powers of two (a block of several rows is then their tile in
    index order, whose halving sum is the torch path's). The optimizer checks it when a group is built."""

    def pow2(x: int) -> bool:
        return x > 0 and x & (x - 1) == 0

    return quant_block <= block or (block >= 2 and pow2(block) and pow2(quant_block))


# The Triton compress kernel holds a group of lcm(block, quant_block, 2) elements in one program's
# registers. A Top-K block is at most 32768 (int16 indices); a larger quantization block would make
# the group, and the compiled tile, grow without bound (a 2**20-element tile does not compile in any
# useful time), so it is held to the same bound.
TRITON_MAX_QUANT_BLOCK = 2**15
# The update kernel compares a block's window entries slot by slot in a tile of next_pow2(k) squared
# elements and gathers them in one of next_pow2(window) * next_pow2(k), and Triton's largest tensor
# is 2**20 elements.
TRITON_MAX_K = 2**10
_TRITON_MAX_TILE = 2**20


def _pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def triton_layout_error(
    block: int, quant_block: int, release: float, k: int, window: int, several_blocks: bool = True
) -> str | None:
    """Why the Triton kernels cannot step tensors of this layout, or None.

    The optimizer asks it of a group with ``impl="triton"`` when the group is built (``k`` of a full
    block); the kernels ask it of each tensor before anything is launched. ``several_blocks``: the
    quantization block's limits hold only for a tensor of more than one Top-K block (a single block
    is one tile row however large the quantization block is)."""
    if k > TRITON_MAX_K:
        return (
            f"impl='triton' keeps at most {TRITON_MAX_K} entries per Top-K block, got k={k} "
            f"(ceil(block * density) with block {block}); use a smaller density or block_size, or impl='torch' "
            "(impl='cpp' on CPU)"
        )
    if _pow2(window) * _pow2(k) > _TRITON_MAX_TILE:
        return (
            f"impl='triton' holds a block's whole window in one tile: next_pow2(window) * next_pow2(k) must be "
            f"<= {_TRITON_MAX_TILE}, got window={window} and k={k}; use a smaller window or density, or "
            "impl='torch' (impl='cpp' on CPU)"
        )
    if not several_blocks:
        return None
    if quant_block > TRITON_MAX_QUANT_BLOCK and quant_block > block:
        return (
            f"impl='triton' holds a quantization block in one program's registers: quant_block_size must be "
            f"<= {TRITON_MAX_QUANT_BLOCK} (or <= block_size), got quant_block_size={quant_block} with "
            f"block_size={block}; use a smaller quant_block_size, or impl='torch' (impl='cpp' on CPU)"
        )
    if release and not release_tiles(block, quant_block):
        # The compress kernel sums a quantization block's squares in its tile's index order.
        return (
            f"release={release!r} with impl='triton' needs quant_block_size <= block_size, or both "
            f"powers of two with block_size >= 2, got quant_block_size={quant_block} and block_size={block}; "
            "use impl=None (automatic), impl='torch' or impl='cpp', a smaller quant_block_size, powers of two, "
            "or variant='paper'"
        )
    return None


# Parameter dtypes the C++ path computes itself (float64 it hands back to the torch path).
_CPP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _cpp_ready() -> bool:
    # The first call compiles the C++ path (about 1.5 s, then cached on disk per user); a failure
    # is remembered, so the automatic rule costs one attempt per process, not one per step.
    return availability("cpp")[0]


def resolve_impl(impl: str | None, param: torch.Tensor) -> str:
    """The implementation that steps ``param``: ``impl`` itself, or for ``None`` the automatic rule.

    The rule (``MicroAdam(impl=None)``, the default):

    - a CPU tensor in float32, bfloat16 or float16: ``"cpp"`` if it builds here (g++ found, the
      build's square root matches torch's), else ``"torch"``. The two give bit-identical results;
      ``"cpp"`` is about 10x faster (``docs/benchmarks.md``).
    - anything else (CUDA, float64): ``"torch"``. The Triton kernels are tested on CPU under the
      interpreter but have not yet run on a GPU; ask for them with ``impl="triton"``.
    """
    if impl is not None:
        return impl
    if param.device.type == "cpu" and param.dtype in _CPP_DTYPES and _cpp_ready():
        return "cpp"
    return "torch"
