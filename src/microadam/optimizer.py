"""The MicroAdam optimizer: argument checks, lazy state, checkpoints, ``step()``."""

from __future__ import annotations

import contextlib
import difflib
import math
import numbers
import os
import signal
import threading
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from copy import deepcopy
from functools import partial
from itertools import chain
from typing import Any

import torch
from torch.optim import Optimizer

from microadam import sharding
from microadam.functional import (
    DEFAULT_CHUNK,
    IMPLEMENTATIONS,
    STATE_DTYPES,
    check_seed,
    check_state,
    never_compiled,
    state_shapes,
    zero_state,
)

# The step without functional.microadam_step's compile guard: step() is never compiled itself, and the
# guard costs a few microseconds a call, a call per tensor.
from microadam.functional import step_in_place as microadam_step
from microadam.kernels import PartialStepError, load_phases, resolve_impl, triton_layout_error
from microadam.layout import MAX_BLOCK_SIZE, Layout, k_per_block, layout_for

__all__ = [
    "MicroAdam",
    "NonFiniteGradientError",
    "VARIANTS",
    "global_offset",
    "GRAD_LIMIT",
    "first_out_of_range",
    "grads_in_range",
    "local_tensor",
    "resolve_variant",
]

# fp16 gradients are summed in float32 this many elements at a time (4 MB of float32), and the exact
# check compares this many elements at a time.
_CHECK_CHUNK = 2**20

# A step whose gradients hold an element beyond this magnitude (about 1.27e30) is treated as one with
# a NaN or Inf: skipped, or raised under nonfinite="raise", state untouched. Finite gradients near
# float32's largest value overflow the step's own arithmetic (the error feedback plus the gradient,
# a quantization block's range hi - lo, the window's weighted sums) and put NaN or Inf into the state
# and the parameters, in every implementation (torch's AdamW overflows there too: its g - m with
# gradients of alternating sign). Within the limit the state keeps 2**14 or more of headroom:
# benchmarks/grad_limit.py steps one block with k = 1 and a gradient of +2**100 every step, the
# error feedback's worst case (nothing cancels, the fewest entries leave), and over 40,000 steps its
# largest value stays below 2**114 (variant "paper"; "release" keeps it at 2**101), as Top-K takes
# the largest entries out each step; float32 overflows at 2**128. Squares may still overflow: the
# second moment of a window value beyond about 2**64 is Inf and the element's update 0, as in AdamW
# (whose dense exp_avg_sq, in fallback_to_adamw's state, then holds +Inf), and release's
# root-mean-square of such a block is Inf, so that block moves nothing and keeps half its residual.
# No useful gradient comes near the limit: fp16's largest value is 65504, and the gradients of a loss
# scaled by a GradScaler are unscaled before the step.
GRAD_LIMIT = 2.0**100
# The largest magnitude a loaded window value or error bound may hold. With gradients within GRAD_LIMIT
# a step keeps both below 2**114 (benchmarks/grad_limit.py: 40,000 steps of the worst case, +2**100 in
# every element, paper variant); a value near float32's maximum (3.4e38 = 2**128) turns parameters NaN
# at the next step, and only an edited or corrupt checkpoint holds one.
STATE_LIMIT = 2.0**120

# Hyperparameters that fix the shapes and meaning of the saved state: a
# checkpoint is only valid under the same values.
LAYOUT_KEYS = ("window", "density", "block_size", "quant_block_size")
RECONFIGURABLE_KEYS = ("window", "density")  # reconfigure() changes them; the other two are fixed per run
STATE_KEYS = ("step", "numel", "window_indices", "window_values", "error_codes", "error_bounds")
DENSE_STATE_KEYS = ("step", "numel", "exp_avg", "exp_avg_sq")


class NonFiniteGradientError(FloatingPointError):
    """A gradient held NaN, Inf or a value beyond :data:`GRAD_LIMIT` (2**100) in magnitude, and
    ``nonfinite="raise"`` was chosen."""


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this process holds: a DTensor's local shard (sharing its storage), else ``t``."""
    # The type name first: getattr of a missing attribute costs a caught exception, per tensor and step.
    return t.to_local() if type(t).__name__ == "DTensor" else t


def global_offset(t: torch.Tensor) -> int:
    """Flat index, in the full tensor, of the first element of this process's shard (0 if not sharded).

    For FSDP2's ``Shard(0)`` the shard is a contiguous range of the full tensor's row-major order,
    so an element's global position is this offset plus its local position; random bits keyed by
    it match a single process's.
    """
    if type(t).__name__ != "DTensor":
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    flat, stride = 0, 1
    for size, off in zip(reversed(t.shape), reversed(offset)):
        flat += off * stride
        stride *= size
    return flat


def _overlaps(t: torch.Tensor) -> bool:
    """Whether elements of ``t`` share memory (an ``expand``-ed view): such a tensor cannot be updated
    in place (torch refuses the write). Exact for zero strides; otherwise a span of memory shorter
    than the element count (the pigeonhole case)."""
    if t.is_contiguous() or t.numel() == 0:
        return False
    sizes, strides = t.shape, t.stride()
    if any(st == 0 and n > 1 for n, st in zip(sizes, strides)):
        return True
    return 1 + sum((n - 1) * abs(st) for n, st in zip(sizes, strides)) < t.numel()


def _storage_key(t: torch.Tensor) -> tuple[torch.device, int] | None:
    """Which memory ``t`` lives in, or None for a tensor that holds none (empty, on meta)."""
    if t.numel() == 0 or t.is_meta:
        return None
    try:
        return t.device, t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None  # a wrapper tensor subclass without storage of its own: nothing to compare


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes of its storage that a (non-empty) tensor's elements lie between: [start, end)."""
    extent = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return t.storage_offset() * t.element_size(), (t.storage_offset() + extent) * t.element_size()


def _share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors on one storage have an element in common (views of one buffer that
    interleave, or lie side by side, have none)."""
    (a0, a1), (b0, b1) = _byte_span(a), _byte_span(b)
    if a1 <= b0 or b1 <= a0:
        return False
    if a.element_size() != b.element_size():
        return True  # overlapping bytes of two dtypes: not worth telling apart
    size = a.element_size()
    mask = torch.zeros(max(a1, b1) // size, dtype=torch.bool)
    mask.as_strided(a.shape, a.stride(), a.storage_offset()).fill_(True)
    return bool(mask.as_strided(b.shape, b.stride(), b.storage_offset()).any())


def _impl_for(group: dict[str, Any], p: torch.Tensor) -> str:
    """The implementation that steps the local tensor ``p`` of ``group``."""
    impl = resolve_impl(group["impl"], p)
    if impl == "cpp" and p.dtype == torch.float64:
        # The C++ call hands float64 to the torch path anyway; stepped here, each such tensor is
        # counted as it is written (inside the C++ call's batch it was written before the call
        # could still fail, uncounted), and it needs no compiler.
        return "torch"
    return impl


def _check_param(index: int, p: torch.Tensor, state: dict[str, Any] | None) -> None:
    """Raise, before a step writes anything, for a parameter that cannot be stepped: one whose size
    changed since its state was built (``p.data = ...``), or one whose elements share memory."""
    numel = state.get("numel") if state else None
    if numel is not None and numel != p.numel():
        raise ValueError(
            f"parameter {index} has {p.numel()} elements (shape {tuple(p.shape)}) but its optimizer state was "
            f"built for {numel}: a parameter's size cannot change during training. Restore its size, or train "
            "the new tensor from scratch by dropping its state (del optimizer.state[param])"
        )
    if _overlaps(p):
        raise ValueError(
            f"parameter {index} (shape {tuple(p.shape)}, strides {p.stride()}) has elements that share memory "
            "(an expand()-ed view?) and cannot be updated in place; give the optimizer a tensor of its own "
            "(param.data = param.data.clone())"
        )


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then hand each one received to its handler.

    Python handlers, swapped for the block: blocking the signals (``pthread_sigmask``) would hold them
    for the calling thread only, and the kernel hands a process's signal to any thread that does not
    block it (torch's worker threads), whose arrival Python then raises in the main thread at once.
    Python runs handlers on the main thread only, so elsewhere there is nothing to hold.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    delivered: set[int] = set()
    previous: dict[int, Any] = {}

    def hold(signum: int, frame: Any) -> None:
        if signum in received:
            # The same signal twice: the user means it (a step that hangs must stay interruptible).
            # Its own handler goes back first: SIG_DFL must act, not come back here.
            signal.signal(signum, previous[signum])
            delivered.add(signum)
            _deliver(signum, previous[signum])
            return
        received.append(signum)

    for sig in _HELD_SIGNALS:
        handler = signal.getsignal(sig)
        if handler is None:  # installed outside Python: left alone
            continue
        try:
            previous[sig] = signal.signal(sig, hold)
        except (ValueError, OSError):  # e.g. a sub-interpreter, which may not set handlers
            break
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        # Every signal received reaches its handler, even after one of them raised (SIGINT's
        # KeyboardInterrupt must not swallow a SIGTERM's handler); the first exception is raised.
        error: BaseException | None = None
        for sig in dict.fromkeys(received):
            if sig in delivered:
                continue
            try:
                _deliver(sig, previous[sig])
            except BaseException as e:  # noqa: BLE001 - re-raised below
                error = error or e
        if error is not None:
            raise error


def _deliver(sig: int, handler: Any) -> None:
    if callable(handler):
        handler(sig, None)  # Python's SIGINT handler raises KeyboardInterrupt here
    elif handler == signal.SIG_DFL:
        signal.raise_signal(sig)  # the default action (SIGTERM: the process ends)


_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _collective_device(device: torch.device) -> torch.device:
    """Where a small tensor for a collective must live: NCCL reduces CUDA tensors only, and FSDP2's
    CPUOffloadPolicy keeps gradients on the CPU; a group with a CPU backend too (gloo) takes them."""
    backend = str(torch.distributed.get_backend())
    if device.type == "cpu" and "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def grads_in_range(grads: list[torch.Tensor]) -> bool:
    """True iff every element of every tensor is finite and at most :data:`GRAD_LIMIT` in magnitude;
    a few reductions and a single host sync.

    The fast check bounds a norm of each tensor (every dtype but fp16; the sum of absolute values or
    the 2-norm): every element is at most the norm, and a NaN or Inf anywhere makes the norm NaN or
    Inf, so a norm ``<= GRAD_LIMIT`` passes the tensor. A norm can exceed the limit (or overflow) where
    no element does, so a failed fast check is confirmed element by element
    (:func:`_exactly_in_range`, only on such a step): the verdict is exact. fp16 cannot exceed the
    limit (its largest value is 65504): it is summed in float32, chunk by chunk, for finiteness only
    (``sum(dtype=float32)`` over the whole tensor would first make a full float32 copy of it).
    Contiguous CPU tensors of float32, bfloat16 or float16 are checked in one C++ call
    (:func:`microadam.kernels.cpu.grads_in_range`) once the C++ path is loaded (by a step that uses
    it; this check never builds it): a torch reduction each costs a few microseconds, most of the
    check for a model of many small tensors. On a GPU: :func:`_in_range_flag`.
    """
    if not grads:
        return True
    from microadam.kernels import cpu

    rest = grads
    if cpu.loaded():
        native, rest = cpu.native_range_args(grads)
        if not cpu.in_range_native(native, GRAD_LIMIT):
            return _exactly_in_range(grads)
        if not rest:
            return True
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in rest:
        groups.setdefault((g.device, g.dtype), []).append(g)
    flags = [_in_range_flag(group, multi_tensor=device.type != "cpu") for (device, _), group in groups.items()]
    device = rest[0].device
    if bool(flags[0] if len(flags) == 1 else torch.stack([f.to(device) for f in flags]).all()):
        return True
    return _exactly_in_range(rest)


# The multi-tensor norm on a GPU needs torch >= 2.6: before it, pytorch/pytorch#140066 (fixed by
# #140103) dropped chunks after an empty tensor, so a NaN there could go unseen.
_MULTI_TENSOR_NORM = torch.torch_version.TorchVersion(torch.__version__) >= (2, 6)
# torch.optim.Optimizer takes (name, tensor) pairs, and keeps the names in "param_names", from torch 2.6.
_NAMED_PARAMS = torch.torch_version.TorchVersion(torch.__version__) >= (2, 6)
# Pieces of at most 2**30 elements for it: a tensor of more than 2**31 made the foreach kernels
# index out of bounds (pytorch/pytorch#169930).
_NORM_PIECE = 2**30


def _in_range_flag(group: list[torch.Tensor], *, multi_tensor: bool) -> torch.Tensor:
    """A 0-d bool tensor, True if every element of ``group`` (tensors of one device and dtype) is finite
    and within :data:`GRAD_LIMIT`; False may also be a norm beyond the limit of elements within it
    (see :func:`grads_in_range`).

    ``multi_tensor`` (a GPU): one multi-tensor reduction (``torch._foreach_norm(pieces, 1)``, the sum of
    absolute values per piece) instead of a norm per tensor: a few kernel launches where the norms
    cost one each, a millisecond of host time for a model of hundreds of tensors, during which the
    GPU waits (the check ends in a sync). Empty tensors are left out and large ones cut in pieces
    (see _MULTI_TENSOR_NORM, _NORM_PIECE); non-contiguous ones are reduced alone (a piece would be a
    copy). On a CPU the per-tensor 2-norms are faster (``benchmarks/finite_check.py``; at 16M float32,
    1.8 ms against 3.9 ms for the sums of absolute values). A signed sum (what this check took before
    the limit) is faster still, 0.7 ms, but ``[1e35, -1e35]`` sums to 0.
    """
    if group[0].dtype == torch.float16:
        norms = [c.sum(dtype=torch.float32).abs() for g in group for c in g.reshape(-1).split(_CHECK_CHUNK)]
    elif multi_tensor and _MULTI_TENSOR_NORM:
        pieces = [c for g in group if g.is_contiguous() and g.numel() for c in g.view(-1).split(_NORM_PIECE)]
        norms = [torch.linalg.vector_norm(g) for g in group if not g.is_contiguous()]
        if pieces:
            norms += list(torch._foreach_norm(pieces, 1))
        if not norms:  # only empty tensors
            return torch.ones((), dtype=torch.bool, device=group[0].device)
    else:
        norms = [torch.linalg.vector_norm(g) for g in group]
    # NaN <= limit is False, as is Inf.
    return (torch.stack(norms) <= GRAD_LIMIT).all()


def _in_range_elements(c: torch.Tensor) -> torch.Tensor:
    """Elementwise: finite and within :data:`GRAD_LIMIT` (NaN compares False). The limit is compared in
    the tensor's dtype, where fp16 makes it Inf: fp16 is checked for finiteness alone, which is the
    same (its largest value is 65504)."""
    return torch.isfinite(c) if c.dtype == torch.float16 else c.abs() <= GRAD_LIMIT


def _exactly_in_range(grads: list[torch.Tensor]) -> bool:
    """Whether every element is finite and within :data:`GRAD_LIMIT`, element by element: the
    confirmation of a failed fast check, so a step whose gradients only made a norm overflow or pass
    the limit is not skipped (nor reported as out of range). Large tensors go in pieces, to bound
    the temporaries."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        for c in g.reshape(-1).split(_CHECK_CHUNK):
            flags.setdefault(g.device, []).append(_in_range_elements(c).all())
    return all(bool(torch.stack(f).all()) for f in flags.values())


def first_out_of_range(grads: list[torch.Tensor]) -> tuple[int, float] | None:
    """The position in ``grads`` of the first tensor holding NaN, Inf or a value beyond :data:`GRAD_LIMIT`
    in magnitude, and its first such value; None if every element is in range. An element-by-element
    pass: for saying what a step that :func:`grads_in_range` refused holds, not for every step."""
    for i, g in enumerate(grads):
        for c in g.reshape(-1).split(_CHECK_CHUNK):
            bad = ~_in_range_elements(c)
            if bool(bad.any()):
                return i, float(c[bad][0])
    return None


def _out_of_range_message(
    work: list[tuple[int, dict[str, Any], torch.Tensor, torch.Tensor]], local: list[torch.Tensor]
) -> tuple[str, str]:
    """What a skipped step's gradients hold, naming the first parameter whose gradient is out of range
    (the index counts every parameter of every group, in order) and its first bad value, and what to
    do about it. A sharded step can be skipped for another rank's shard: this rank then says so."""
    found = first_out_of_range(local)
    if found is None:
        return (
            f"a gradient on another rank holds NaN, Inf or a value beyond GRAD_LIMIT = 2**100 ({GRAD_LIMIT:.3g}); "
            "this rank's are in range",
            "That rank's warning or error names it",
        )
    i, value = found
    index, group, p, _ = work[i]
    # Built from model.named_parameters(), a group holds the names too (torch >= 2.6).
    names = group.get("param_names")
    position = next((j for j, q in enumerate(group["params"]) if q is p), None)
    name = f" {names[position]!r}" if names and position is not None and position < len(names) else ""
    where = f"the gradient of parameter {index}{name} (shape {tuple(p.shape)})"
    if math.isfinite(value):
        return (
            f"{where} holds {value:.3g}, beyond GRAD_LIMIT = 2**100 ({GRAD_LIMIT:.3g}) in magnitude",
            "MicroAdam's sums would overflow at such values; a gradient this large means the run has "
            "diverged: lower the learning rate or clip the gradients (torch.nn.utils.clip_grad_norm_)",
        )
    return f"{where} holds {value}", "Find the source (e.g. torch.autograd.set_detect_anomaly)"


def _check_number(name: str, value: Any, *, low: float, low_inclusive: bool = True, fix: str = "") -> None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    # numbers.Real: NumPy scalars too (a scheduler's lambda may return np.float32).
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < low or (value == low and not low_inclusive):
        bound = "" if low == -math.inf else f" and >= {low}" if low_inclusive else f" and > {low}"
        raise ValueError(f"Invalid {name}: {value!r}; it must be finite{bound}{fix}")


# Named settings of the released error feedback (``MicroAdam(variant=...)``). "release" is the
# default since the quality-gap measurements of docs/results.md; "paper" is Modoranu et al.'s
# algorithm exactly (release=0), kept by name and by its tests.
VARIANTS: dict[str, dict[str, float]] = {
    "release": dict(release=0.5, release_scale=1.0),
    "paper": dict(release=0.0, release_scale=1.0),
}


def resolve_variant(variant: str, release: float | None, release_scale: float | None) -> tuple[float, float]:
    """(release, release_scale) of ``variant``, with explicit values taking precedence.

    ``variant="paper"`` is the paper's algorithm, so it refuses a nonzero ``release``.
    """
    if not isinstance(variant, str) or variant not in VARIANTS:
        raise ValueError(f"Invalid variant: {variant!r}; use one of {sorted(VARIANTS)}")
    preset = VARIANTS[variant]
    if variant == "paper" and release not in (None, 0, 0.0):
        raise ValueError(
            f"variant='paper' is the paper's algorithm, which releases nothing, but release={release!r} was "
            "given; drop one of the two (variant='release' or no variant for a released error feedback)"
        )
    return (
        preset["release"] if release is None else release,
        preset["release_scale"] if release_scale is None else release_scale,
    )


_SET_ERROR = (
    "params is a set, whose order changes between runs (and with it each tensor's random-rounding stream "
    "and its id in a checkpoint); pass a list, e.g. list(model.parameters())"
)


def plain_number(v: Any) -> Any:
    """``v`` as a Python number if it is a NumPy scalar (``np.float32(1e-3)``, ``np.int64(10)``: a scheduler's
    lambda may return one, and ``torch.load(weights_only=True)`` refuses them); anything else as it is."""
    if isinstance(v, numbers.Number) and type(v) not in (bool, int, float, complex):
        if hasattr(v, "item"):
            return v.item()
        if isinstance(v, numbers.Integral):
            return int(v)
        if isinstance(v, numbers.Real):
            return float(v)  # a Fraction: a checkpoint must load with weights_only=True
    return v


def _plain_numbers(group: dict[str, Any]) -> dict[str, Any]:
    """``group`` with NumPy scalars as Python numbers, as torch's optimizers accept them; tensors (a tensor
    lr) and everything else are kept as they are."""
    out = {k: (v if k == "params" else plain_number(v)) for k, v in group.items()}
    if isinstance(out.get("betas"), (tuple, list)):
        out["betas"] = tuple(plain_number(b) for b in out["betas"])
    return out


def _check_group(group: dict[str, Any], *, at_step: bool = False) -> None:
    """Validate one param group's hyperparameters; raise naming the argument and the value.

    ``at_step``: the check of every step, of values a scheduler or a user may have set since. It asks
    lr, eps and weight_decay to be finite only, as torch's optimizers take any value set after they
    were built: a scheduler decaying to 0 by repeated arithmetic can end a hair below it
    (``LinearLR(start_factor=0.1, end_factor=0.0)`` ends at -4e-21), and a NaN or Inf is what would
    poison every parameter.
    """
    low = -math.inf if at_step else 0.0
    _check_number("lr", group["lr"], low=low)
    _check_number("eps", group["eps"], low=low)
    _check_number("weight_decay", group["weight_decay"], low=low)
    _check_number("release", group.get("release", 0.0), low=0.0)
    if group.get("release", 0.0) > 1.0:
        raise ValueError(
            f"Invalid release: {group['release']!r}; it must be in [0, 1] (the fraction of the error "
            "feedback released per step; 0 is the paper's algorithm)"
        )
    _check_number("release_scale", group.get("release_scale", 1.0), low=0.0)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r}; pass two numbers, e.g. betas=(0.9, 0.999)")
    for i, b in enumerate(betas):
        if isinstance(b, torch.Tensor):
            b = b.item()
        if not isinstance(b, numbers.Real) or isinstance(b, bool) or not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b!r}; it must be in [0, 1)")
        if math.copysign(1.0, b) < 0:
            # -0.0 passes the range test, but the C++ step's second-moment sums need weights >= +0.
            raise ValueError(f"Invalid beta parameter at index {i}: {b!r}; it must be in [0, 1): use 0.0, not -0.0")
    density = group["density"]
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"density must be a number, got {type(density).__name__} {density!r}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"Invalid density: {density!r}; it must be in (0, 1], e.g. 0.01 keeps 1% per block")
    check_seed(group["seed"])
    for name in ("window", "block_size", "quant_block_size", "chunk_size"):
        v = group[name]
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
        if v < 1:
            raise ValueError(f"Invalid {name}: {v}; it must be >= 1")
    if group["block_size"] > MAX_BLOCK_SIZE:
        raise ValueError(
            f"Invalid block_size: {group['block_size']}; it must be <= {MAX_BLOCK_SIZE} "
            "so block-relative indices fit in int16"
        )
    b, q = group["block_size"], group["quant_block_size"]
    if b % q and q % b:
        raise ValueError(
            f"block_size={b} and quant_block_size={q}: one must divide the other "
            "so that chunks hold whole blocks of both (e.g. block_size=4096, quant_block_size=128)"
        )
    if group["error_rounding"] not in ("nearest", "stochastic"):
        raise ValueError(f"Invalid error_rounding: {group['error_rounding']!r}; use 'nearest' or 'stochastic'")
    if group["stochastic_rounding"] not in (True, False):
        raise TypeError(f"stochastic_rounding must be True or False, got {group['stochastic_rounding']!r}")
    if group.get("dense", False) not in (True, False):
        raise TypeError(f"dense must be True or False, got {group['dense']!r}")
    if group["nonfinite"] not in ("skip", "raise"):
        raise ValueError(f"Invalid nonfinite: {group['nonfinite']!r}; use 'skip' or 'raise'")
    if group["impl"] not in (None, *IMPLEMENTATIONS):
        raise ValueError(f"Invalid impl: {group['impl']!r}; use None (automatic) or one of {IMPLEMENTATIONS}")
    if group["impl"] == "triton":
        k = k_per_block(b, group["density"])
        problem = triton_layout_error(b, q, group.get("release", 0.0), k, group["window"])
        if problem is not None:
            raise ValueError(problem)


class MicroAdam(Optimizer):
    r"""MicroAdam: Adam over a window of Top-K-compressed gradients with 4-bit error feedback.

    Modoranu et al., "MicroAdam: Accurate Adaptive Optimization with Low Space
    Overhead and Provable Convergence", NeurIPS 2024. For each parameter
    (flattened, d elements, cut into blocks of ``block_size``) at step t:

    .. math::
        a &= g_t + \mathrm{dequant}(e_{t-1}) \\
        I_t, V_t &= \text{Top-}k \text{ of } |a| \text{ in each block}, \quad
            k = \lceil \mathrm{block\_size} \cdot \mathrm{density} \rceil \\
        r &= a \text{ with } I_t \text{ zeroed}, \quad
            D = \rho_{\mathrm{rel}}\, r / \mathrm{rms}_q(r) \ \text{(per block of } q\text{)} \\
        e_t &= \mathrm{quant}_4((1 - \gamma)\, r) \\
        M &= \textstyle\sum_{s} \beta_1^{t-s} V_s, \quad S = \sum_s \beta_2^{t-s} V_s^2
            \quad (s \text{ over the last } \min(t, m) \text{ steps}) \\
        u &= \frac{(1-\beta_1)/(1-\beta_1^t)\, M}{\sqrt{(1-\beta_2)/(1-\beta_2^t)\, S} + \epsilon} \\
        p &\leftarrow p\,(1 - \mathrm{lr}\cdot\lambda) - \mathrm{lr}\cdot D - \mathrm{lr}\cdot u

    with :math:`\gamma` = ``release`` and :math:`\rho_{\mathrm{rel}}` = ``release_scale`` (``D = 0``
    when ``release = 0``: the paper's algorithm, ``variant="paper"``).

    State per parameter: the window (int16 block-relative indices and bf16
    values, ``window`` slots of ``k`` per block), 4-bit error codes packed two
    per byte with bf16 (lo, hi) per ``quant_block_size`` elements, and a step
    count: about ``4 * window * density + 0.5 + 4 / quant_block_size`` bytes per
    parameter, 0.93 at the defaults (AdamW: 8), whatever the variant. The window's
    ``window * k`` coordinates per block move by about ``3.2 * lr`` each; with the default
    ``variant="release"`` every other coordinate moves too, by ``lr * release_scale`` in RMS per
    block, so learning rates tuned for AdamW are a fair start (on the MiniLM fine-tunes of
    ``docs/results.md`` AdamW's best lr, 1e-4, was also the one used for MicroAdam).
    The paper's algorithm moves only the window's coordinates; its best lr was about 3x AdamW's.

    Args:
        params: parameters or param groups; every hyperparameter below may differ per group.
        lr: learning rate (required).
        betas: coefficients of the window's first and second moments (default ``(0.9, 0.999)``).
        eps: added to the denominator (default ``1e-8``).
        weight_decay: decoupled weight decay, AdamW-style (default ``0``).
        window: m, gradients kept in the ring (default ``10``).
        density: fraction kept per Top-K block (default ``0.01``).
        block_size: Top-K block size, at most 32768 (default ``4096``); a tensor
            smaller than a block is one block.
        quant_block_size: elements sharing one (lo, hi) in the error
            quantization (default ``128``); one of the two block sizes must divide the other, and
            ``impl="triton"`` needs it at most 32768 or at most ``block_size``.
        error_rounding: ``"nearest"`` (default, as the authors' code) or
            ``"stochastic"`` (unbiased, as the convergence proof assumes).
        stochastic_rounding: round bf16 parameters stochastically after the
            update (default ``True``; see ``docs/bf16_rounding.md`` for the
            measurement behind it). Has no effect on other dtypes.
        seed: seeds the counter-based random bits of stochastic rounding (default ``0``).
        nonfinite: what a NaN/Inf in any gradient, or a value beyond :data:`GRAD_LIMIT` (2**100) in
            magnitude, does: ``"skip"`` (default)
            skips the whole step with no state change, counts it in
            ``skipped_steps`` and warns once; ``"raise"`` raises
            :class:`NonFiniteGradientError` with state untouched.
        impl: ``"torch"`` (the vectorized PyTorch path, any device), ``"triton"`` (fused Triton
            kernels for CUDA tensors, all of a step's tensors in one launch per kernel; CPU tensors
            under ``TRITON_INTERPRET=1``, for tests), ``"cpp"`` (a C++/OpenMP path for CPU tensors,
            compiled with g++ on first use), or ``None`` (default: chosen per tensor by
            :func:`microadam.kernels.resolve_impl`). All give the same state bit for bit; an
            unavailable one raises ``RuntimeError`` saying why at the first step.
        chunk_size: elements the torch path processes at once, bounding its transient memory to
            about 95-180 bytes per chunk element (default ``2**20``; ``docs/algorithm.md``); the C++
            path's buffers do not depend on it.
        variant: ``"release"`` (default) or ``"paper"``: named settings of the two arguments below.
            ``"release"`` is ``release=0.5, release_scale=1.0``, chosen on two tasks and confirmed on
            two others (``docs/results.md``); ``"paper"`` is the paper's algorithm exactly
            (``release=0``). Explicit ``release`` / ``release_scale`` take precedence.
        release: fraction of the error feedback released each step as a dense move (from
            ``variant``; ``0`` is the paper's algorithm). With ``r`` what Top-K left of ``a`` (the
            error the paper stores), each quantization block of the parameter also moves by
            ``lr * release_scale * r / rms(r)`` and only ``(1 - release) * r`` is stored as the
            error: every coordinate moves every step, not only the window's, at unchanged memory.
            Measured in ``docs/results.md`` (issue 8); every ``impl`` implements it (``"triton"``
            where ``quant_block_size <= block_size``, as by default, or both are powers of two).
        release_scale: RMS of that dense move over a quantization block, in units of ``lr``
            (from ``variant``: ``1.0``, about AdamW's step size).

    Example:
        >>> import torch
        >>> from microadam import MicroAdam
        >>> model = torch.nn.Linear(64, 8)
        >>> opt = MicroAdam(model.parameters(), lr=1e-3)
        >>> loss = model(torch.randn(4, 64)).square().mean()
        >>> loss.backward()
        >>> opt.step()
        >>> opt.zero_grad()
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        window: int = 10,
        density: float = 0.01,
        block_size: int = 4096,
        quant_block_size: int = 128,
        *,
        error_rounding: str = "nearest",
        stochastic_rounding: bool = True,
        seed: int = 0,
        nonfinite: str = "skip",
        impl: str | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        variant: str = "release",
        release: float | None = None,
        release_scale: float | None = None,
    ) -> None:
        release, release_scale = resolve_variant(variant, release, release_scale)
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas,
            eps=eps,
            weight_decay=weight_decay,
            window=window,
            density=density,
            block_size=block_size,
            quant_block_size=quant_block_size,
            error_rounding=error_rounding,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
            nonfinite=nonfinite,
            impl=impl,
            chunk_size=chunk_size,
            release=release,
            release_scale=release_scale,
            # Set by fallback_to_adamw(): the group then runs dense AdamW on fp32 moments.
            dense=False,
        )
        defaults = _plain_numbers(defaults)
        _check_group(defaults)
        if isinstance(params, (set, frozenset)):
            # torch takes a set here (and refuses one in a group); its order changes between runs,
            # and with it each tensor's random-rounding stream and id in the checkpoint.
            raise TypeError(_SET_ERROR)
        super().__init__(params, defaults)
        self.skipped_steps = 0
        self._warned_nonfinite = False
        # id(group) -> (group, (block_size, quant_block_size) its states were stepped with): see
        # _check_blocks. The group itself is held so that its id cannot be reused by another dict.
        self._blocks: dict[int, tuple[dict[str, Any], tuple[int, int]]] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(
                f"param_group must be a dict, got {type(param_group).__name__}: "
                "optimizer.add_param_group({'params': tensors, 'lr': ...})"
            )
        param_group = _plain_numbers(param_group)
        if "variant" in param_group:
            # A group may name a variant too: it stands for its (release, release_scale).
            param_group = dict(param_group)
            release, scale = resolve_variant(
                param_group.pop("variant"), param_group.get("release"), param_group.get("release_scale")
            )
            param_group.update(release=release, release_scale=scale)
        for key in param_group:
            # torch keeps any key (a group's "name", say); a near miss of a setting is a typo whose value
            # would be ignored in silence.
            known = [*self.defaults, "params", "param_names"]
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.8) if key not in known else []
            if close:
                warnings.warn(
                    f"param group key {key!r} is not a MicroAdam setting and is ignored; did you mean {close[0]!r}?",
                    UserWarning,
                    stacklevel=3,
                )
        # Check a merged copy before torch appends the group: a refused group must leave no trace.
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        _check_group(merged)
        params = param_group["params"]
        if isinstance(params, (set, frozenset)):
            raise TypeError(_SET_ERROR)
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        seen: set[int] = set()
        # The memory of every parameter already held, to refuse a new one on the same elements: the
        # many-tensor paths step a non-contiguous parameter on a copy made before the call and copy it
        # back after, so one of two updates of the same elements was lost (the torch path applied both,
        # one after the other). Views of one buffer that do not overlap stay fine.
        # Each with its byte span, and per storage the end of the furthest: views of a flat buffer listed
        # in order each start where the last ended, and are compared with none (comparing every pair
        # took 42 s for 4,000 views); only spans that overlap are compared element by element.
        held: dict[tuple[torch.device, int], list[tuple[int, int, torch.Tensor, tuple[int, int]]]] = {}
        reach: dict[tuple[torch.device, int], int] = {}

        def hold(key: tuple[torch.device, int], gi: int, j: int, q: torch.Tensor) -> None:
            span = _byte_span(local_tensor(q))
            held.setdefault(key, []).append((gi, j, q, span))
            reach[key] = max(reach.get(key, span[1]), span[1])

        for gi, g in enumerate(self.param_groups):
            for j, q in enumerate(g["params"]):
                key = _storage_key(local_tensor(q)) if q.requires_grad else None
                if key is not None:
                    hold(key, gi, j, q)
        for i, item in enumerate(params):
            # (name, tensor) pairs, as from model.named_parameters(): torch (>= 2.6) keeps the names.
            p = item[1] if isinstance(item, tuple) and len(item) == 2 else item
            if not isinstance(p, torch.Tensor):
                raise TypeError(
                    f"MicroAdam optimizes tensors, got {type(p).__name__} in params; pass model.parameters() "
                    "or model.named_parameters()"
                )
            if not p.requires_grad:
                # Frozen (a quantized base weight of a LoRA model, int8): never given a gradient, so
                # never stepped, as in torch's optimizers. One that gets a gradient anyway is refused
                # at the step (_gradients).
                pass
            elif p.is_complex():
                raise TypeError(
                    f"MicroAdam does not support complex parameters (got {p.dtype}, shape {tuple(p.shape)}); "
                    "store the parameter as a real tensor with a last dimension of 2 (real, imaginary) and "
                    "view it with torch.view_as_complex in forward, or optimize it with torch.optim.AdamW"
                )
            elif p.dtype not in _PARAM_DTYPES:
                raise TypeError(
                    f"MicroAdam steps float32, bfloat16, float16 and float64 parameters, got params[{i}] of {p.dtype}; "
                    "keep a master copy in one of these (float8 training does, e.g. torchao.float8), or freeze it "
                    "(requires_grad=False) if it is not trained"
                )
            if id(p) in seen:
                # torch only warns; MicroAdam would step the tensor twice per step.
                raise ValueError(
                    f"params[{i}] (shape {tuple(p.shape)}) appears twice in this param group and would be stepped "
                    "twice per step; list each tensor once (tied weights are one tensor)"
                )
            seen.add(id(p))
            if _overlaps(local_tensor(p)):
                raise ValueError(
                    f"params[{i}] (shape {tuple(p.shape)}, strides {p.stride()}) has elements that share memory "
                    "(an expand()-ed view?) and cannot be updated in place; pass a tensor of its own (.clone())"
                )
            # A frozen parameter is never stepped: it may share a trained one's memory.
            key = _storage_key(local_tensor(p)) if p.requires_grad else None
            start, end = _byte_span(local_tensor(p)) if key is not None else (0, 0)
            near = held.get(key, []) if key is not None and start < reach.get(key, start) else []
            for gi, j, q, (q0, q1) in near:
                if start < q1 and q0 < end and q is not p and _share_elements(local_tensor(p), local_tensor(q)):
                    where = f"params[{j}] of param group {gi}" if gi < len(self.param_groups) else f"params[{j}]"
                    raise ValueError(
                        f"params[{i}] (shape {tuple(p.shape)}) shares memory with {where} (shape "
                        f"{tuple(q.shape)}): the optimizer would step those elements twice per step, and its C++ "
                        "and Triton paths would lose one of the two updates. Tie them as one tensor "
                        "(decoder.weight = encoder.weight, with a transpose in forward if needed), or give one a "
                        "copy of its own (nn.Parameter(w.detach().clone()))"
                    )
            if key is not None:
                hold(key, len(self.param_groups), i, p)
            # A DTensor sharding MicroAdam cannot checkpoint (tensor parallelism's Shard(1), ...) is
            # refused here, not at the first state_dict() after hours of training.
            sharding.shard_spec(p)
        if not _NAMED_PARAMS:
            # torch < 2.6 takes tensors only: the names of (name, tensor) pairs are dropped.
            params = [item[1] if isinstance(item, tuple) and len(item) == 2 else item for item in params]
        super().add_param_group({**param_group, "params": params})

    def __getstate__(self) -> dict[str, Any]:
        # torch keeps defaults, state and param_groups only; a copy also keeps its count of skipped steps.
        return {**super().__getstate__(), "skipped_steps": self.skipped_steps}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("skipped_steps", 0)
        self.__dict__.setdefault("_blocks", {})
        self.__dict__.setdefault("_warned_nonfinite", False)

    @staticmethod
    def layout(p: torch.Tensor, group: dict[str, Any]) -> Layout:
        """The state layout of parameter ``p`` under ``group``'s hyperparameters."""
        return MicroAdam._layout_of(local_tensor(p).numel(), group)

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        lay = self.layout(p, group)
        state = self.state[p]
        p = local_tensor(p)
        state["step"] = 0
        state["numel"] = lay.numel
        state.update(zero_state(lay, p.device))
        return state

    def _gradients(
        self,
    ) -> tuple[list[tuple[int, dict[str, Any], torch.Tensor, torch.Tensor]], list[tuple[int, dict, Any, Any]]]:
        """(global index, group, param, grad) for every parameter with a gradient: those with values, and
        those on the meta device."""
        out = []
        meta = []
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is not None:
                    if g.is_sparse or g.layout != torch.strided:
                        raise TypeError(
                            f"MicroAdam does not support sparse gradients (parameter {index}, layout {g.layout}); "
                            "use a dense embedding (sparse=False) or torch.optim.SparseAdam for it"
                        )
                    if p.dtype not in _PARAM_DTYPES:
                        # Converted after it was added (model.to(dtype)), or frozen and given a gradient
                        # anyway: refused here, before the range check (which cannot reduce float8).
                        raise TypeError(
                            f"parameter {index} (shape {tuple(p.shape)}) is {p.dtype} and has a gradient, but "
                            "MicroAdam steps float32, bfloat16, float16 and float64 parameters (converted after the "
                            "optimizer was built? model.to(dtype)); convert it back, or freeze it "
                            "(requires_grad=False, grad=None); nothing was changed"
                        )
                    if g.numel() != p.numel():
                        raise ValueError(
                            f"gradient of parameter {index} has {g.numel()} elements but the parameter has "
                            f"{p.numel()}; assign a gradient of the parameter's shape {tuple(p.shape)}"
                        )
                    (meta if g.is_meta else out).append((index, group, p, g))
                index += 1
        return out, meta

    def _grads_in_range(self, grads: list[torch.Tensor]) -> bool:
        return grads_in_range(grads)

    # Never compiled (functional.never_compiled says why): eager inside a compiled training step, it
    # gives the same state as everywhere else.
    @never_compiled
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Parameters on the meta device (a shape-only dry run, e.g. to measure the state's size) hold no
        # values to check or step: their state is created and counted, as torch's optimizers do on meta.
        work, meta = self._gradients()
        # The group's arguments, converted once per step (id(group) -> kwargs), and each (group, size)
        # layout looked up once: a model's hundreds of tensors share a few groups, and the host time
        # per tensor is what a step of many small tensors costs.
        group_kwargs: dict[int, dict[str, Any]] = {}
        layouts: dict[tuple[int, int], Layout] = {}
        phases_of: dict[str, Any] = {}  # impl -> its (prepare, run), or None, looked up once per step
        # Tensors of a many-tensor implementation whose state exists are prepared (checked, their
        # arguments built, nothing written) before the range check: on a GPU the host waits at
        # the check for the GPU to finish the backward pass, and work done before it overlaps that.
        batched: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
        prepared: dict[str, list[Any]] = {}
        later: list[tuple[int, dict[str, Any], torch.Tensor, torch.Tensor, Any]] = []  # (..., (impl, kwargs) or None)
        # An error here (a bad state, a missing implementation) is raised only once the check has
        # decided the step is taken, as before the two phases: a step skipped for a NaN stays
        # skipped, and under FSDP2 a rank does not leave the others waiting in the flag's all_reduce.
        early_error: Exception | None = None
        try:
            for index, group, p, g in work:
                state = self.state.get(p)  # .get: a skipped step must not leave empty entries behind
                _check_param(index, local_tensor(p), state)
                if id(group) not in group_kwargs:  # checks the group's hyperparameters, dense ones too
                    try:
                        group_kwargs[id(group)] = self._group_kwargs(group)
                    except (TypeError, ValueError) as e:
                        # Named: a model has several groups (no decay for biases), and "Invalid lr: inf"
                        # does not say which one a scheduler or an edit of param_groups broke.
                        index = next(i for i, g in enumerate(self.param_groups) if g is group)
                        raise type(e)(f"param_groups[{index}]: {e}") from None
                    self._check_blocks(group)
                if group.get("dense", False) or not state or "step" not in state:
                    if not group.get("dense", False):
                        # A new state's implementation is loaded now, so that one missing here (impl="triton"
                        # without CUDA, "cpp" without a compiler) is raised before any state is created.
                        impl = _impl_for(group, local_tensor(p))
                        if impl != "torch" and impl not in phases_of:
                            phases_of[impl] = load_phases(impl)
                    later.append((index, group, p, g, None))
                    continue
                impl, kwargs = self._step_args(index, group, p, g, state, group_kwargs, layouts, phases_of)
                if phases_of.get(impl) is None:
                    # Checked here too (the torch path checks as it steps, after earlier tensors were written).
                    try:
                        check_state(kwargs["layout"], **{name: kwargs[name] for name in STATE_DTYPES})
                    except ValueError as e:
                        raise ValueError(f"parameter {index}: {e}") from None
                    later.append((index, group, p, g, (impl, kwargs)))
                    continue
                batched.setdefault(impl, []).append((state, kwargs))
            for impl, items in batched.items():
                prepared[impl] = phases_of[impl][0]([kwargs for _, kwargs in items])
        except Exception as e:
            early_error = e

        local = [local_tensor(g) for _, _, _, g in work]
        in_range = self._grads_in_range(local)
        if any(type(p).__name__ == "DTensor" for _, _, p, _ in work) and torch.distributed.is_initialized():
            # Sharded: each rank sees its shard's gradients only; all must skip, or none.
            flag = torch.tensor([1.0 if in_range else 0.0], device=_collective_device(local[0].device))
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            in_range = bool(flag.item() > 0.5)
        if not in_range:
            # Which gradient, and what it holds: one more pass, only on a step that is not taken.
            what, fix = _out_of_range_message(work, local)
            policy = {group["nonfinite"] for _, group, _, _ in work}
            if "raise" in policy:
                raise NonFiniteGradientError(
                    f"{what}; the optimizer state is unchanged. {fix}, or pass nonfinite='skip' to skip such steps"
                )
            self.skipped_steps += 1
            if not self._warned_nonfinite:
                warnings.warn(
                    f"MicroAdam skipped a step: {what}; the state is unchanged. {fix}. Further skips are counted "
                    "in optimizer.skipped_steps without warning (pass nonfinite='raise' to raise instead)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._warned_nonfinite = True
            return loss
        if early_error is not None:
            raise early_error

        # From the first write to the last step count, SIGINT and SIGTERM wait: a Ctrl-C that landed
        # between a tensor's write and its count (most of a step's time is the writes) would leave the
        # count behind the state, and the next step would write the same ring slot again.
        with _signals_held():
            # New states, dense fallbacks and the torch path, after the check (which the state of a
            # skipped step must not see created). Every many-tensor item is checked before any tensor
            # is written; a torch-path tensor checks its own arguments as it steps.
            immediate = []
            late: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
            for index, group, p, g, args in later:
                if group.get("dense", False):
                    immediate.append((None, index, group, p, g, None))
                    continue
                state = self.state[p]
                if args is not None:  # built before the check (a torch-path tensor with state)
                    immediate.append((state, index, group, p, g, args))
                    continue
                if "step" not in state:
                    state = self._init_state(p, group)
                impl, kwargs = self._step_args(index, group, p, g, state, group_kwargs, layouts, phases_of)
                if phases_of.get(impl) is None:
                    immediate.append((state, index, group, p, g, (impl, kwargs)))
                else:
                    late.setdefault(impl, []).append((state, kwargs))
            for impl, items in late.items():
                prepared.setdefault(impl, []).extend(phases_of[impl][0]([kwargs for _, kwargs in items]))
                batched.setdefault(impl, []).extend(items)
            for state, index, group, p, g, args in immediate:
                if args is None:
                    self._dense_step(p, g, group, index)
                    continue
                impl, kwargs = args
                # The counter advances only once the step has succeeded, so a failure (e.g. out of
                # memory) does not give the unwritten ring slot a wrong age. Parameters already
                # updated earlier in this step stay updated: retrying the whole step applies their
                # update twice; restore a checkpoint (or a Guard snapshot) instead.
                microadam_step(local_tensor(p), local_tensor(g), impl=impl, **kwargs)
                state["step"] += 1
            failed: list[int] = []  # parameter indices (param_groups order) a many-tensor call could not step
            for impl, items in batched.items():
                bad: set[int] = set()
                try:
                    # One call for many tensors: small tensors do not cost a kernel launch each.
                    phases_of[impl][1](prepared[impl])
                except PartialStepError as e:
                    # The call stepped every tensor but the failed ones (positions in the call, which
                    # follow no order a user knows: new states join at the end); the other
                    # implementations' calls still run, so that only the corrupt tensors miss the step.
                    bad = set(e.failed)
                    failed.extend(items[i][1]["param_index"] for i in bad)
                for i, (state, _) in enumerate(items):
                    if i not in bad:
                        state["step"] += 1
            # Counted last: a step that raised before (a new state's arguments refused) counts none.
            for _, group, p, _ in meta:
                state = self.state[p]
                if group.get("dense", False):
                    self._dense_state(p, state)
                elif "step" not in state:
                    state = self._init_state(p, group)
                state["step"] += 1
            if failed:
                failed.sort()
                raise PartialStepError(
                    f"the state of parameter(s) {failed} (their positions in param_groups order) is corrupt: "
                    "window_indices hold an index outside its Top-K block (loaded from a checkpoint of another "
                    "layout?). Every other parameter was stepped; restore a checkpoint (or a Guard snapshot), or "
                    "drop those parameters' state to restart them",
                    failed,
                )
        return loss

    def _check_blocks(self, group: dict[str, Any]) -> None:
        """Raise if ``group``'s block sizes were edited since its states were stepped with others.

        The state's shapes catch most such edits (``check_state``), but not one that leaves them as
        they were (100 elements: ``quant_block_size`` 64 or 96 both make two blocks); the error codes
        would then be decoded with another block's bounds, in silence. A group without MicroAdam state
        takes new values (its states are built with them).
        """
        now = (group["block_size"], group["quant_block_size"])
        held = self._blocks.get(id(group))
        if held is not None and held[1] != now:
            if any("window_indices" in self.state.get(p, ()) for p in group["params"]):
                index = next(i for i, g in enumerate(self.param_groups) if g is group)
                (block, quant), (new_block, new_quant) = held[1], now
                raise ValueError(
                    f"param group {index} was stepped with block_size={block}, quant_block_size={quant} and now "
                    f"has block_size={new_block}, quant_block_size={new_quant}: block_size and quant_block_size "
                    "cannot change during training (the state is laid out by them). Put them back; to train with "
                    "others, build a new MicroAdam, whose state starts empty. Nothing was changed"
                )
        self._blocks[id(group)] = (group, now)

    def _step_args(
        self,
        index: int,
        group: dict[str, Any],
        p: torch.Tensor,
        g: torch.Tensor,
        state: dict[str, Any],
        group_kwargs: dict[int, dict[str, Any]],
        layouts: dict[tuple[int, int], Layout],
        phases_of: dict[str, Any],
    ) -> tuple[str, dict[str, Any]]:
        """The implementation of one tensor's step and its arguments (with ``param`` and ``grad``, the
        local shards, for a many-tensor implementation), using and filling the step's caches."""
        shared = group_kwargs.get(id(group))
        if shared is None:
            shared = group_kwargs[id(group)] = self._group_kwargs(group)
        p_local = local_tensor(p)
        impl = _impl_for(group, p_local)
        numel = p_local.numel()
        layout = layouts.get((id(group), numel))
        if layout is None:
            layout = layouts[id(group), numel] = self._layout_of(numel, group)
        kwargs = dict(
            shared,
            window_indices=state["window_indices"],
            window_values=state["window_values"],
            error_codes=state["error_codes"],
            error_bounds=state["error_bounds"],
            layout=layout,
            step=state["step"] + 1,
            param_index=index,
            position_offset=global_offset(p) if p_local is not p else 0,
        )
        if impl != "torch" and impl not in phases_of:
            phases_of[impl] = load_phases(impl)
        if phases_of.get(impl) is not None:
            kwargs["param"], kwargs["grad"] = p_local, local_tensor(g)
        return impl, kwargs

    @staticmethod
    def _group_kwargs(group: dict[str, Any]) -> dict[str, Any]:
        """The step arguments that every tensor of ``group`` shares, as plain numbers."""
        # Checked again at every step, before anything is written: a scheduler or a user edits
        # param_groups directly, and lr=nan or weight_decay=inf would turn every parameter NaN.
        _check_group(group, at_step=True)
        beta1, beta2 = group["betas"]
        kwargs = dict(
            lr=float(group["lr"]),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            error_rounding=group["error_rounding"],
            stochastic_param_rounding=group["stochastic_rounding"],
            seed=group["seed"],
            chunk_size=group["chunk_size"],
        )
        if group.get("release", 0.0):
            kwargs.update(release=float(group["release"]), release_scale=float(group["release_scale"]))
        return kwargs

    # ------------------------------------------------------------------ changing compression

    def _groups(self, groups: Iterable[int] | None) -> list[dict[str, Any]]:
        if groups is None:
            return list(self.param_groups)
        if not isinstance(groups, Iterable) or isinstance(groups, (str, bytes)):
            raise TypeError(
                f"groups takes the indices of param groups, e.g. groups=[0], got {type(groups).__name__} {groups!r}"
            )
        out = []
        for i in groups:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                raise TypeError(f"groups: a param group index must be an int, got {type(i).__name__} {i!r}")
            if not 0 <= i < len(self.param_groups):
                raise ValueError(f"groups: no param group {i}; this optimizer has {len(self.param_groups)}")
            out.append(self.param_groups[i])
        return out

    @torch.no_grad()
    def reconfigure(
        self, *, density: float | None = None, window: int | None = None, groups: Iterable[int] | None = None
    ) -> None:
        """Change density and/or window of live param groups, converting their state.

        Raising either loses nothing: the error feedback is unchanged (its
        layout does not depend on them), every window entry keeps its age, and
        new room is filled with zero entries, which add nothing to the moments.
        Lowering the window drops the oldest slots (they would age out anyway);
        lowering the density keeps the largest-magnitude entries of each slot
        and drops the rest from the moment estimates (their past updates stay
        applied). State bytes follow the new layout (see :meth:`layout`).
        """
        plans = []
        # Check every group before changing any: a refused change leaves the optimizer as it was.
        # NumPy scalars as Python numbers, as the constructor takes them (its check wants plain numbers).
        density, window = plain_number(density), plain_number(window)
        for group in self._groups(groups):
            if group.get("dense", False):
                raise ValueError("reconfigure: this param group runs dense AdamW after fallback_to_adamw()")
            new = dict(group)
            if density is not None:
                new["density"] = density
            if window is not None:
                new["window"] = window
            _check_group(new, at_step=True)  # the group's lr may be where a scheduler put it
            plans.append((group, new))
        # Every tensor's new window is built before any is assigned: running out of memory half way
        # (a raised window is the state that grows) leaves the optimizer as it was.
        converted = []
        for group, new in plans:
            for p in group["params"]:
                st = self.state.get(p)
                if not st or "window_indices" not in st:
                    continue
                old, lay = self.layout(p, group), self.layout(p, new)
                p = local_tensor(p)
                t = st["step"]
                idx = torch.zeros((lay.window, lay.num_blocks, lay.k), dtype=torch.int16, device=p.device)
                val = torch.zeros((lay.window, lay.num_blocks, lay.k), dtype=torch.bfloat16, device=p.device)
                for age in range(min(t, old.window, lay.window)):
                    src_i = st["window_indices"][(t - 1 - age) % old.window]
                    src_v = st["window_values"][(t - 1 - age) % old.window]
                    if lay.k < old.k:
                        keep = src_v.float().abs().topk(lay.k, dim=1).indices.sort(dim=1).values
                        src_i, src_v = src_i.gather(1, keep), src_v.gather(1, keep)
                    dst = (t - 1 - age) % lay.window
                    idx[dst, :, : src_i.shape[1]] = src_i
                    val[dst, :, : src_v.shape[1]] = src_v
                converted.append((st, idx, val))
        for st, idx, val in converted:
            st["window_indices"], st["window_values"] = idx, val
        for group, new in plans:
            group.update(new)

    @torch.no_grad()
    def error_feedback_norm(self) -> tuple[float, int]:
        """(L2 norm of the dequantized error feedback over all parameters, elements counted).

        A diagnostic for the guard: divided by the gradient norm it says how
        much gradient mass waits in the error feedback.
        """
        from microadam.ops.quant import dequantize_blocks, unpack_nibbles

        total, count = 0.0, 0
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                p = local_tensor(p)
                if not st or "error_codes" not in st or p.numel() == 0:
                    continue
                if st["error_codes"].is_meta:
                    raise ValueError(
                        "error_feedback_norm: the parameters are on the meta device (a shape-only dry run): its "
                        "state holds no values to measure; call it on an optimizer of real parameters"
                    )
                q = group["quant_block_size"]
                # Chunks of whole quantization blocks bound the transient float32 memory.
                rows = max(2, 2**20 // q)
                rows -= rows % 2  # an even element count per chunk: packed bytes never straddle two
                bounds = st["error_bounds"]
                for r0 in range(0, bounds.shape[0], rows):
                    r1 = min(r0 + rows, bounds.shape[0])
                    n = min(r1 * q, p.numel()) - r0 * q
                    codes = unpack_nibbles(st["error_codes"][r0 * q // 2 : (r0 * q + n + 1) // 2], n)
                    pad = (r1 - r0) * q - n
                    if pad:
                        codes = torch.cat([codes, codes.new_zeros(pad)])
                    e = dequantize_blocks(codes.view(r1 - r0, q), bounds[r0:r1, 0], bounds[r0:r1, 1], torch.float32)
                    total += float(e.view(-1)[:n].double().square().sum())
                count += p.numel()
        return total**0.5, count

    @torch.no_grad()
    def fallback_to_adamw(self, groups: Iterable[int] | None = None) -> None:
        """Switch param groups to dense AdamW in place, initialised from MicroAdam's state.

        The window gives AdamW's moments: ``exp_avg = (1 - b1) * (M + e)`` and
        ``exp_avg_sq = (1 - b2) * (S + e^2)``, where ``M``, ``S`` are the window
        sums of step 5 and ``e`` is the dequantized error feedback (gradient
        mass MicroAdam had not applied yet, so it is not lost); the step count
        continues. The optimizer object stays the same, so LR schedulers,
        Trainer and checkpoints keep working; state grows to 8 bytes per parameter.
        """
        from microadam.ops.quant import dequantize_blocks, unpack_nibbles

        # Every tensor's AdamW state is built before any is assigned: running out of memory half way
        # (the state grows to 8 bytes per parameter) leaves the optimizer as it was, and a retry
        # after freeing memory converts everything.
        switched, dense_state, dropped = [], {}, []
        for group in self._groups(groups):
            if group.get("dense", False):
                continue
            switched.append(group)
            b1, b2 = group["betas"]
            for param in group["params"]:
                st = self.state.get(param)
                p = local_tensor(param)
                dt = torch.float64 if p.dtype == torch.float64 else torch.float32
                if not st or "window_indices" not in st:
                    if st is not None:
                        dropped.append(param)
                    continue
                lay, t, n = self.layout(p, group), st["step"], p.numel()
                m = torch.zeros(lay.num_blocks * lay.block, dtype=dt, device=p.device)
                v = torch.zeros_like(m)
                base = (torch.arange(lay.num_blocks, device=p.device) * lay.block)[:, None]
                for age in range(min(t, lay.window)):
                    slot = (t - 1 - age) % lay.window
                    pos = (st["window_indices"][slot].long() + base).view(-1)
                    val = st["window_values"][slot].to(dt).view(-1)
                    m.index_add_(0, pos, val * b1**age)
                    v.index_add_(0, pos, val * val * b2**age)
                q = lay.quant_block
                codes = unpack_nibbles(st["error_codes"], n)
                codes = torch.cat([codes, codes.new_zeros(lay.num_quant_blocks * q - n)])
                b = st["error_bounds"]
                e = dequantize_blocks(codes.view(-1, q), b[:, 0], b[:, 1], dt).view(-1)[:n]
                m, v = m[:n] + e, v[:n] + e * e
                dense_state[param] = {
                    "step": t,
                    "numel": n,
                    "exp_avg": ((1 - b1) * m).view(p.shape),
                    "exp_avg_sq": ((1 - b2) * v).view(p.shape),
                }
        for param in dropped:
            self.state.pop(param)
        self.state.update(dense_state)
        for group in switched:
            group["dense"] = True

    @staticmethod
    def _dense_state(param: torch.Tensor, st: dict[str, Any]) -> None:
        """Create AdamW's fp32 moments (fp64 for a float64 parameter) in ``st`` if it has none."""
        p = local_tensor(param)
        dt = torch.float64 if p.dtype == torch.float64 else torch.float32
        if "exp_avg" not in st:
            st.update(
                step=0,
                numel=p.numel(),
                exp_avg=torch.zeros(p.shape, dtype=dt, device=p.device),
                exp_avg_sq=torch.zeros(p.shape, dtype=dt, device=p.device),
            )

    def _dense_step(self, p: torch.Tensor, g: torch.Tensor, group: dict[str, Any], index: int) -> None:
        """AdamW (decoupled weight decay, bias correction as torch.optim.AdamW) on fp32 moments."""
        st = self.state[p]
        offset = global_offset(p)
        self._dense_state(p, st)
        p, g = local_tensor(p), local_tensor(g)
        dt = torch.float64 if p.dtype == torch.float64 else torch.float32
        if st["exp_avg"].shape != p.shape:
            # Same size, another shape (p.data = p.data.view(...); the size was checked before the step):
            # the moments follow, as MicroAdam's flat state does.
            st["exp_avg"], st["exp_avg_sq"] = st["exp_avg"].reshape(p.shape), st["exp_avg_sq"].reshape(p.shape)
        if st["exp_avg"].dtype != dt:
            # The parameter became float64, or stopped being (model.double() after the fallback): the
            # moments follow, as torch's load_state_dict casts them (else the first such tensor failed
            # the step after the tensors before it were written).
            st["exp_avg"], st["exp_avg_sq"] = st["exp_avg"].to(dt), st["exp_avg_sq"].to(dt)
        # Everything is computed out of place first and written at the end: a failure (out of memory)
        # half way changes nothing, so a retry does not apply the gradient to the moments twice. The
        # price is two moment-sized temporaries, in the fallback only.
        t, lr = st["step"] + 1, float(group["lr"])
        b1, b2 = group["betas"]
        g32 = g.to(dt)
        m = torch.lerp(st["exp_avg"], g32, 1 - b1)
        v = (st["exp_avg_sq"] * b2).addcmul_(g32, g32, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(group["eps"])
        new = p.to(dt) * (1 - lr * group["weight_decay"])
        new.addcdiv_(m, denom, value=-lr / (1 - b1**t))
        if p.dtype != dt:
            from microadam.ops.random import STREAM_PARAM, hash_bits, stream_key
            from microadam.ops.rounding import round_to_dtype

            bits = None
            if group["stochastic_rounding"] and p.dtype == torch.bfloat16:
                key = stream_key(group["seed"], index, t, STREAM_PARAM)
                bits = hash_bits(torch.arange(p.numel(), device=p.device) + offset, key).view(p.shape)
            new = round_to_dtype(new, p.dtype, bits)
        st["exp_avg"].copy_(m)
        st["exp_avg_sq"].copy_(v)
        p.copy_(new)
        st["step"] = t

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The state as plain tensors and Python scalars (loads with ``torch.load(weights_only=True)``).

        As in torch, each parameter's entry is the live one, tensors shared, not
        copied: a dict kept and saved after further steps holds the later state,
        whole (a copy of each entry held its step count, a Python int, at the
        time of the call, while its tensors moved on: the resumed run went wrong
        in silence). Its ``param_groups`` are copies, as in torch, so after a
        :meth:`reconfigure` or :meth:`fallback_to_adamw` (the Guard's compression
        actions) a kept dict no longer fits and its load is refused. Copy it
        (``copy.deepcopy``) to keep this step's state. A
        sharded (DTensor) parameter's entry is
        in the global layout of :mod:`microadam.sharding`, as DTensors, so
        ``torch.distributed.checkpoint`` can reshard it; for a shard that does not
        hold whole blocks this gathers over the mesh, so every rank must call it.
        """
        # torch runs the post-hooks inside its state_dict, and what a hook returns is what the caller
        # gets: this method's own changes are made before them, so a hook sees (and may replace) the
        # final dict.
        post_hooks = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = OrderedDict()
        try:
            sd = super().state_dict()
        finally:
            self._optimizer_state_dict_post_hooks = post_hooks
        # An empty entry (left by reading optimizer.state[p] of a parameter never stepped: state is a
        # defaultdict) is no state: it is not saved. A value that is no dict (a user's own entry under a
        # key that is no parameter, which torch keeps) is saved as it is.
        sd["state"] = {k: v for k, v in sd["state"].items() if not (isinstance(v, dict) and not v)}
        # NumPy scalars a scheduler's lambda put in the groups (np.float32 lr) would make the checkpoint
        # refuse torch.load(weights_only=True); as Python numbers they are the same values.
        sd["param_groups"] = [_plain_numbers(g) for g in sd["param_groups"]]
        params = [p for g in self.param_groups for p in g["params"]]
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        blob = None
        for k in sorted(sd["state"], key=str):
            p = params[k] if isinstance(k, int) and k < len(params) else None
            if p is not None and type(p).__name__ == "DTensor":
                if blob is None:  # torch will flatten the dict, which takes no bytes (see sharding)
                    blob = not sharding.flattening_requested()
                group = group_of[id(p)]
                sd["state"][k] = sharding.to_global(
                    sd["state"][k],
                    p,
                    self._layout_of(p.numel(), group),
                    partial(self._layout_of, group=group),
                    blob=blob,
                )
        if sharding.loading_through_dcp():
            # A template that set_optimizer_state_dict fills with the checkpoint's values before it calls
            # load_state_dict: copies, so that a load refused there leaves the state as it was (one
            # transient copy of the state, on a resume only).
            sd["state"] = {
                k: {n: t.clone() if isinstance(t, torch.Tensor) else t for n, t in v.items()}
                if isinstance(v, dict)
                else v
                for k, v in sd["state"].items()
            }
        # The steps skipped for out-of-range gradients, as copies (deepcopy, pickle) keep them: a resumed run's
        # count goes on. torch.distributed.checkpoint keeps only "state" and "param_groups" (then the count
        # stays as it is on load).
        sd["skipped_steps"] = self.skipped_steps
        for hook in post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    @staticmethod
    def _layout_of(numel: int, group: dict[str, Any]) -> Layout:
        return layout_for(
            numel,
            block_size=group["block_size"],
            density=group["density"],
            quant_block_size=group["quant_block_size"],
            window=group["window"],
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`, keeping integer state exact.

        torch's default casts every floating state tensor to the parameter's
        dtype and would turn bf16 window values into fp16 or fp32; it is not
        used. Everything is checked before anything changes: a state saved with
        another window, density, block size, quantization block size or
        parameter size raises ``ValueError`` naming both values, and the
        optimizer is left as it was. The exception: inside torch's
        ``set_state_dict`` after ``dcp.load``, whose template held the live
        state tensors, the checkpoint is already in them; those parameters'
        state is then dropped (they start fresh), and the error says so.
        """
        try:
            self._load_state_dict(state_dict)
        except Exception as e:
            dropped = self._drop_overwritten(state_dict) if sharding.loading_through_dcp() else []
            if not dropped:
                raise
            raise ValueError(
                f"{e}. The checkpoint had already been written into this optimizer's state tensors: dcp.load "
                "fills the template that get_state_dict() hands out, which holds the live state (for every torch "
                f"optimizer). So the state of parameter(s) {dropped} (their positions in param_groups order), no "
                "longer this run's, was dropped: they start fresh at their next step, unless a checkpoint that "
                "fits is loaded"
            ) from e

    def _drop_overwritten(self, state_dict: Any) -> list[int]:
        """Drop the state of every parameter whose live state tensors are among ``state_dict``'s (a DCP
        template that dcp.load filled); return their positions in param_groups order."""
        incoming: set[tuple[torch.device, int]] = set()
        entries = state_dict.get("state") if isinstance(state_dict, Mapping) else None
        for saved in entries.values() if isinstance(entries, Mapping) else ():
            for v in saved.values() if isinstance(saved, Mapping) else ():
                key = _storage_key(local_tensor(v)) if isinstance(v, torch.Tensor) else None
                if key is not None:
                    incoming.add(key)
        dropped = []
        for i, p in enumerate(p for g in self.param_groups for p in g["params"]):
            st = self.state.get(p)
            if st and any(isinstance(v, torch.Tensor) and _storage_key(v) in incoming for v in st.values()):
                del self.state[p]
                dropped.append(i)
        return dropped

    def _load_state_dict(self, state_dict: Any) -> None:
        if not isinstance(state_dict, Mapping):
            path = isinstance(state_dict, (str, os.PathLike))
            hint = " (a path? load it first: torch.load(path, weights_only=True))" if path else ""
            raise TypeError(
                f"load_state_dict takes the dict that optimizer.state_dict() returned, got "
                f"{type(state_dict).__name__}{hint}; nothing was changed"
            )
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"not an optimizer state dict: the key {key!r} is missing")
        # The structure before the values: a malformed entry is named here, not met as a TypeError deep in.
        if not isinstance(state_dict["state"], dict):
            raise ValueError(f"the loaded 'state' is a {type(state_dict['state']).__name__}, not a dict of entries")
        if not isinstance(state_dict["param_groups"], (list, tuple)) or not all(
            isinstance(sg, dict) and isinstance(sg.get("params"), (list, tuple)) for sg in state_dict["param_groups"]
        ):
            raise ValueError(
                "the loaded 'param_groups' must be a list of dicts, each with a 'params' list; the checkpoint is "
                "corrupt or not an optimizer's"
            )
        try:
            listed = set(chain.from_iterable(sg["params"] for sg in state_dict["param_groups"]))
        except TypeError as e:
            raise ValueError(
                f"the loaded 'param_groups' list parameters by unhashable ids ({e}); the checkpoint is corrupt or "
                "not an optimizer's"
            ) from e
        for pid, saved in state_dict["state"].items():
            if not _is_param_key(pid, listed):
                if isinstance(saved, dict) and any(k in saved for k in (*STATE_KEYS, *DENSE_STATE_KEYS)):
                    # Kept as a user's entry, a parameter's state under a wrong key would be lost unseen.
                    raise ValueError(
                        f"the loaded state holds a parameter's state under the key {pid!r}, which no group lists "
                        "(state_dict() keys it by the parameter's index, as its groups list it): the checkpoint "
                        "was changed"
                    )
                continue  # a user's own entry (torch keeps a key that is no parameter's as it is)
            if not isinstance(saved, dict):
                raise ValueError(
                    f"the loaded state of parameter {pid!r} is a {type(saved).__name__}, not a dict of state tensors; "
                    "the checkpoint is corrupt or not an optimizer's"
                )
            if "numel" in saved and _whole_number(saved["numel"]) is None:
                raise ValueError(
                    f"the loaded numel of parameter {pid!r} is {saved['numel']!r}; it must be a whole number"
                )
        groups = self.param_groups
        saved_groups = deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"the loaded state has {len(saved_groups)} parameter groups but this optimizer has {len(groups)}"
            )
        for gi, (g, sg) in enumerate(zip(groups, saved_groups)):
            if not any(key in sg for key in LAYOUT_KEYS):
                # Another optimizer's groups (an AdamW state dict, e.g. a training script's optimizer
                # swapped): loaded, it would set this one's hyperparameters to AdamW's (weight decay
                # 0.01, the paper's algorithm for a group saved without release) without a word.
                foreign = sorted(k for k in sg if k not in self.defaults and k not in ("params", "param_names"))
                raise ValueError(
                    f"parameter group {gi} of the loaded state has none of MicroAdam's settings {list(LAYOUT_KEYS)}"
                    f"{f' and has {foreign}' if foreign else ''}: it was saved by another optimizer. Load it into "
                    "that optimizer, or keep this MicroAdam's fresh state (its hyperparameters are those it was "
                    "built with)"
                )
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"parameter group {gi}: the loaded state has {len(sg['params'])} parameters "
                    f"but this optimizer has {len(g['params'])}"
                )
            for key in LAYOUT_KEYS:
                # A group that fell back to dense AdamW keeps no window or codes: its state does
                # not depend on the layout.
                if key not in sg or sg[key] == g[key] or sg.get("dense", False):
                    continue
                if key in RECONFIGURABLE_KEYS:
                    # reconfigure() (the Guard's raise_density, raise_window, auto_density) changes these
                    # during a run, and a run's own checkpoint must resume where it was (Trainer and
                    # Lightning build the optimizer as configured, then load): the state goes with the
                    # value it was saved under, as lr does.
                    warnings.warn(
                        f"MicroAdam.load_state_dict: parameter group {gi} resumes with {key}={sg[key]!r} from the "
                        f"checkpoint (this optimizer was built with {key}={g[key]!r}; reconfigure() or the Guard "
                        f"changed it during the saved run). Call reconfigure({key}=...) after loading to change it",
                        stacklevel=2,
                    )
                else:
                    raise ValueError(
                        f"parameter group {gi}: the checkpoint was saved with {key}={sg[key]!r} but this "
                        f"optimizer has {key}={g[key]!r}; its state only has meaning under the same value. "
                        f"Build the optimizer with {key}={sg[key]!r}, or start from a fresh optimizer state"
                    )
        id_map = dict(
            zip(
                chain.from_iterable(g["params"] for g in saved_groups),
                chain.from_iterable(g["params"] for g in groups),
            )
        )
        param_groups = []
        for gi, (g, sg) in enumerate(zip(groups, saved_groups)):
            # impl is how this machine runs the step, not a hyperparameter (every implementation gives the
            # same state): the one this optimizer was built with stays (a checkpoint of a GPU run with
            # impl="triton" loads on a CPU machine).
            merged = {**self.defaults, **sg, "params": g["params"], "impl": g["impl"]}
            if "release" not in sg:
                # Saved before release existed: that run was the paper's algorithm; it resumes as one.
                merged.update(VARIANTS["paper"])
            if "param_names" in g and "param_names" not in sg:
                merged["param_names"] = g["param_names"]
            # As a step checks them: values a scheduler set are saved as they were (LinearLR decaying to 0
            # ends a hair below it), and a checkpoint taken then must load.
            try:
                _check_group(merged, at_step=True)
            except (TypeError, ValueError) as e:
                raise type(e)(f"the loaded param group {gi}: {e}") from None
            param_groups.append(merged)
        # State is checked against the hyperparameters it will run under (the saved ones).
        group_of = {id(p): g for g in param_groups for p in g["params"]}
        new_state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        for pid, saved in state_dict["state"].items():
            if not _is_param_key(pid, listed):
                new_state[pid] = saved
                continue
            if pid not in id_map:
                raise ValueError(f"the loaded state has an entry for parameter {pid!r}, which no group lists")
            p = id_map[pid]
            if isinstance(saved, dict) and not saved:
                continue  # no state (an empty entry, as older versions saved): the parameter starts fresh
            new_state[p] = self._checked_param_state(pid, p, saved, group_of[id(p)])
        skipped = state_dict.get("skipped_steps", self.skipped_steps)
        if _whole_number(skipped) is None or _whole_number(skipped) < 0:
            raise ValueError(
                f"the loaded 'skipped_steps' is {skipped!r}, not a whole number >= 0; the checkpoint is corrupt "
                "(delete the key to keep this optimizer's count); nothing was changed"
            )
        self.__setstate__({"state": new_state, "param_groups": param_groups})
        self.skipped_steps = _whole_number(skipped)
        self._blocks = {}  # the new groups' states were checked against their block sizes above
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _checked_param_state(self, pid: Any, p: torch.Tensor, saved: dict[str, Any], group: dict) -> dict[str, Any]:
        keys = DENSE_STATE_KEYS if group.get("dense", False) else STATE_KEYS
        missing = [k for k in keys if k not in saved]
        if missing:
            raise ValueError(
                f"the loaded state of parameter {pid!r} lacks {missing}; it was not saved by MicroAdam "
                "(or by an incompatible version)"
            )
        sharded = type(p).__name__ == "DTensor"
        if sharded or "row_ids" in saved:
            if _whole_number(saved["numel"]) != p.numel():
                raise ValueError(
                    f"the loaded state of parameter {pid!r} was saved for a tensor of {saved['numel']} elements, "
                    f"but this parameter has {p.numel()} (shape {tuple(p.shape)}); load it into the same model"
                )
            if "row_ids" not in saved:  # a single process's state: the global layout, whole
                rows = p.shape[0] if p.dim() else 1
                saved = {**saved, "row_ids": torch.arange(rows, dtype=torch.int32)}
            saved = sharding.to_local(
                saved,
                p if sharded else None,
                self._layout_of(p.numel(), group),
                partial(self._layout_of, group=group),
                pid,
            )
        p = local_tensor(p)  # a sharded parameter's state is its shard's
        if _whole_number(saved["numel"]) != p.numel():
            raise ValueError(
                f"the loaded state of parameter {pid!r} was saved for a tensor of {saved['numel']} elements, "
                f"but this parameter has {p.numel()} (shape {tuple(p.shape)}); load it into the same model"
            )
        lay = self.layout(p, group)
        out: dict[str, Any] = {"step": _checked_step(pid, saved["step"]), "numel": _whole_number(saved["numel"])}
        if group.get("dense", False):
            float_dt = torch.float64 if p.dtype == torch.float64 else torch.float32
            for key in ("exp_avg", "exp_avg_sq"):
                t = saved[key]
                if isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.float64):
                    t = t.to(float_dt)  # saved from a float64 model into a float32 one, or back, as torch casts
                out[key] = _checked_tensor(pid, key, t, tuple(p.shape), float_dt).to(
                    p.device, memory_format=torch.contiguous_format, copy=True
                )
                # exp_avg_sq may hold +Inf: the square of a gradient beyond about 1.8e19 (within GRAD_LIMIT)
                # overflows float32, in the dense fallback's step as in torch's AdamW (the element's update
                # is then 0). NaN, -Inf or a negative value cannot come from a step.
                bad = ~torch.isfinite(out[key]) if key == "exp_avg" else ~(out[key] >= 0)
                if bool(bad.any()):
                    allowed = "finite values" if key == "exp_avg" else "values >= 0 (+Inf included)"
                    raise ValueError(
                        f"the loaded {key!r} of parameter {pid!r} holds {float(out[key][bad][0])} where a step "
                        f"leaves only {allowed}; the checkpoint is corrupt"
                    )
            return out
        checked = check_micro_state(pid, saved, lay)
        # Copy, keeping the dtype, into contiguous memory on the parameter's device: .to(copy=True)
        # keeps a dense tensor's strides, and a state saved transposed (same values, other strides)
        # made the torch path fail in a view and the Triton path refuse it.
        contiguous = torch.contiguous_format
        out.update({k: t.to(device=p.device, memory_format=contiguous, copy=True) for k, t in checked.items()})
        return out


def _is_param_key(key: Any, listed: set[Any]) -> bool:
    """Whether a state dict's ``state`` key stands for a parameter: one the saved groups list (an index,
    as state_dict() saves it, or a name, as torch.distributed.checkpoint passes it), or an int (which,
    listed by no group, is refused). Any other key is a user's own entry, which torch keeps as it is."""
    return key in listed or (isinstance(key, numbers.Integral) and not isinstance(key, bool))


def _whole_number(value: Any) -> int | None:
    """``value`` as an int if it is a whole number (an int, NumPy integer, a float such as 3.0, or a
    one-element tensor of one), else None."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_meta:
            return None
        value = value.item()
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    return None


def _checked_step(pid: Any, step: Any) -> int:
    """A loaded step count as an int in [0, 2**62]: any whole number (:func:`_whole_number`)."""
    value = _whole_number(step)
    if value is None or not 0 <= value <= 2**62:
        raise ValueError(
            f"the loaded step of parameter {pid!r} is {step!r}; it must be an integer in [0, 2**62] (the number of "
            "steps taken); the checkpoint is corrupt"
        )
    return int(value)


def _checked_tensor(pid: Any, key: str, t: Any, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if isinstance(t, torch.Tensor) and t.is_meta:
        raise ValueError(
            f"the loaded {key!r} of parameter {pid!r} is on the meta device: the state of a shape-only dry run "
            "holds no values. Load the checkpoint of a run that trained, or keep this optimizer's state"
        )
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(
            f"the loaded {key!r} of parameter {pid!r} is {got}, expected {dtype} {shape}; "
            "the checkpoint is corrupt or from another configuration"
        )
    return t


def check_micro_state(pid: Any, saved: dict[str, Any], lay: Layout) -> dict[str, torch.Tensor]:
    """The four MicroAdam state tensors of ``saved``, checked against ``lay``; ``ValueError`` otherwise.

    Values, not just shapes: an index outside its block would move a coordinate of another block;
    a non-finite value or bound would fill the window with NaN at the next step.
    """
    out = {
        key: _checked_tensor(pid, key, saved[key], shape, STATE_DTYPES[key]) for key, shape in state_shapes(lay).items()
    }
    for key in ("window_values", "error_bounds"):
        bad = ~(out[key].abs() <= STATE_LIMIT)  # NaN compares False
        if bool(bad.any()):
            raise ValueError(
                f"the loaded {key!r} of parameter {pid!r} holds {float(out[key][bad][0])}: NaN, Inf or a magnitude "
                f"beyond 2**120 ({STATE_LIMIT:.3g}), which no step leaves; the checkpoint is corrupt"
            )
    if lay.numel > 0:
        idx = out["window_indices"].long()
        # Real length of each block: the last one may be partial.
        lengths = torch.full((lay.num_blocks,), lay.block, device=idx.device)
        lengths[-1] = lay.numel - (lay.num_blocks - 1) * lay.block
        if bool((idx < 0).any()) or bool((idx >= lengths[None, :, None]).any()):
            raise ValueError(
                f"the loaded 'window_indices' of parameter {pid!r} point outside their blocks "
                f"(block size {lay.block}); the checkpoint is corrupt"
            )
        bounds = out["error_bounds"]
        if bool((bounds[:, 0] > bounds[:, 1]).any()):
            raise ValueError(f"the loaded 'error_bounds' of parameter {pid!r} have lo > hi; the checkpoint is corrupt")
    return out
