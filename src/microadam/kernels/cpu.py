"""``impl="cpp"``: one MicroAdam step on CPU tensors in C++/OpenMP, bit-identical to the torch path.

The source, ``csrc/microadam_cpu.cpp``, is plain C++ (no torch headers) compiled on first use with
``g++ -O3 -fopenmp -ffp-contract=off -march=native`` into a per-user cache (``$XDG_CACHE_HOME/microadam``
or ``~/.cache/microadam``) and called through :mod:`ctypes` with raw pointers. Not a torch extension
(``torch.utils.cpp_extension``), which would need ninja and compile the torch headers: this
file needs g++ alone and builds in about 1 s.

The file name of the built library is a hash of the source, the compiler's version, the flags and
the target options that ``-march=native`` expands to on this machine, so an edited source, another
compiler or another CPU (a home directory shared between machines) each get their own build. A
build writes a temporary file in the cache and renames it into place, so processes that build at
the same time never load a half-written library.

Everything the step computes from the step number (ring slot ages, bias corrections ``c1`` and
``c2``, the decay factor, the random stream keys) comes from :func:`microadam.functional.step_scalars`,
which the torch path uses too, and is handed to C++ as numbers, so the paths cannot drift apart on it.
float64 parameters (the testing dtype) run the torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import struct
import subprocess
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from microadam import functional
from microadam.kernels import PartialStepError, prepare_each, state_key
from microadam.layout import Layout
from microadam.ops.random import STREAM_ERROR, STREAM_PARAM, stream_key

__all__ = [
    "prepare_many",
    "run_prepared",
    "grads_in_range",
    "available",
    "in_range_native",
    "loaded",
    "microadam_step_cpp",
    "microadam_step_cpp_multi",
    "native_range_args",
]

_SOURCE = Path(__file__).resolve().parent / "csrc" / "microadam_cpu.cpp"
_COMPILER = "g++"
# -ffp-contract=off: the torch path rounds every multiply and add separately; an FMA would change
# the last bit and break bit-identity.
_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off", "-fno-math-errno")
# MICROADAM_CPP_PROFILE=1 builds the per-phase counters that benchmarks/cpu_phases.py reads (a build
# of its own: the flags are part of the cache key).
if os.environ.get("MICROADAM_CPP_PROFILE") == "1":
    _FLAGS += ("-DMICROADAM_PROFILE",)
# The .cpp's AVX-512 paths (Top-K candidates, min/max, quantization, gradient decoding), which
# -march=native enables on a CPU that has them, make the step 3x faster than a portable -O3 build
# (measured on the 2-core AMD EPYC (Zen 5, CPU family 26) dev machine, one core, data in cache: 1.9
# vs 6.1 cycles per element); a CPU with AVX2 only gets AVX2 loops (16M step on the same machine,
# docs/benchmarks.md: 11.8 ms built with -march=x86-64-v3, 9.1 with AVX-512). If the build for
# this CPU does not compile, the portable build is used. MICROADAM_CPP_MARCH chooses another
# target than "native" (e.g. x86-64-v3 for a cache shared by machines of several CPUs, or to
# measure the AVX2 loops on an AVX-512 machine).
_NATIVE = (f"-march={os.environ.get('MICROADAM_CPP_MARCH', 'native')}",)
# (param or grad dtype) -> the .cpp's DType enum.
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ERROR_ROUNDINGS = ("nearest", "stochastic")
_FIX = "use impl='torch'"
# Elements per thread below which the step runs on one thread: torch's own grain size
# (at::internal::GRAIN_SIZE), under which its kernels do not start threads either. A parallel region
# for a small tensor costs more than it saves, and far more when other processes hold the cores.
_GRAIN = 32768
# The .cpp's SqrtMode.
_SQRT_IEEE, _SQRT_MKL, _SQRT_RSQRT = 0, 1, 2

_lock = threading.Lock()
# "lib": (the loaded library, (MKL's sqrt address, SqrtMode)), or "error": why there is none.
_state: dict[str, object] = {}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "microadam"


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _native_target(compiler: str) -> str | None:
    """What ``-march=native`` means here (the full list of target options), or None if unsupported."""
    out = _run([compiler, *_NATIVE, "-Q", "--help=target"])
    return out.stdout if out.returncode == 0 else None


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _library_path(compiler: str, flags: tuple[str, ...], key_extra: str, source: bytes) -> Path:
    """Where the build for these inputs lives in the cache; the name is a hash of all of them."""
    version = _run([compiler, "--version"]).stdout
    digest = hashlib.sha256(
        b"\0".join([source, version.encode(), " ".join(flags).encode(), key_extra.encode()])
    ).hexdigest()[:20]
    return _cache_dir() / f"microadam_cpu-{digest}.so"


def _build(compiler: str, flags: tuple[str, ...], key_extra: str, source: bytes) -> Path:
    """Compile (or find in the cache) the library for ``flags``; raises RuntimeError with g++'s output."""
    target = _library_path(compiler, flags, key_extra, source)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".microadam_cpu-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        out = _run([compiler, *flags, str(_SOURCE), "-o", tmp])
        if out.returncode != 0:
            raise RuntimeError(f"exit code {out.returncode}:\n{_tail(out.stderr)}")
        os.replace(tmp, target)  # atomic: a concurrent build replaces it with an identical file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class _StepArgs(ctypes.Structure):
    """One tensor's step for the C++ code: the layout of its ``StepArgs``. The fields that stay the
    same from step to step come first, this step's from ``grad`` on; within each part pointers,
    64-bit integers, doubles, 32-bit integers, so that neither side pads differently."""

    _fields_ = [
        *[(name, ctypes.c_void_p) for name in ("param", "win_idx", "win_val", "codes", "bounds")],
        *[(name, ctypes.c_int64) for name in ("n", "block", "k", "qblock", "num_blocks", "unit", "position_offset")],
        *[(name, ctypes.c_int32) for name in (
            "param_dtype", "grad_dtype", "weight_decay", "stochastic_error", "stochastic_param", "release",
        )],
        ("grad", ctypes.c_void_p),
        *[(name, ctypes.c_void_p) for name in ("slot_of_age", "w1", "w2")],
        *[(name, ctypes.c_int64) for name in ("n_slots", "write_slot")],
        *[(name, ctypes.c_double) for name in ("lr", "c1", "c2", "eps", "decay", "keep", "release_scale")],
        ("err_key", ctypes.c_uint32),
        ("par_key", ctypes.c_uint32),
    ]  # fmt: skip


# A row is four byte strings joined: the tensor's steady fields (cached per tensor), the gradient's
# address, the fields every tensor of a param group shares in a step (cached per step), and the
# tensor's random stream keys.
_GRAD_AT = _StepArgs.grad.offset
_SHARED_AT = _StepArgs.slot_of_age.offset
_KEYS_AT = _StepArgs.err_key.offset
_ADDRESS = struct.Struct("=Q")
_KEYS = struct.Struct("=II")
_NO_KEYS = _KEYS.pack(0, 0)


def _declare(lib: ctypes.CDLL) -> None:
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    fn = lib.microadam_step_cpu_multi
    fn.restype = i64
    # count, items, bad flags, vml_sqrt, sqrt_mode, num_threads
    fn.argtypes = [i64, ctypes.POINTER(_StepArgs), ctypes.POINTER(ctypes.c_int32), ptr, i32, i32]
    probe = lib.microadam_sqrt_probe
    probe.restype = None
    probe.argtypes = [ptr, ptr, i64, ptr, i32]
    for name in ("microadam_step_args_size", "microadam_step_args_step_offset"):
        getattr(lib, name).restype = i64
        getattr(lib, name).argtypes = []
    if (lib.microadam_step_args_size(), lib.microadam_step_args_step_offset()) != (
        ctypes.sizeof(_StepArgs),
        _GRAD_AT,
    ):
        # The kernel would read the wrong fields: a library built from another version of the source.
        raise RuntimeError(
            f"the library's StepArgs ({lib.microadam_step_args_size()} bytes, this step's part at "
            f"{lib.microadam_step_args_step_offset()}) does not match kernels/cpu.py's ({ctypes.sizeof(_StepArgs)}, "
            f"{_GRAD_AT})"
        )
    in_range = lib.microadam_grads_in_range
    in_range.restype = ctypes.c_int32
    # count, data pointers, numels, dtype codes, limit, num_threads
    in_range.argtypes = [
        i64, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(i64), ctypes.POINTER(ctypes.c_int32), ctypes.c_float, i32,
    ]  # fmt: skip


def _mkl_sqrt() -> int | None:
    """Address of MKL's ``vmsSqrt_64`` (or ``vmsSqrt``) inside torch's own library, or None (a torch
    built without MKL)."""
    if not torch.backends.mkl.is_available():
        return None
    for path in sorted((Path(torch.__file__).resolve().parent / "lib").glob("libtorch_cpu.*")):
        try:
            lib = ctypes.CDLL(str(path))  # already loaded by torch: the same handle
        except OSError:
            continue
        # The ILP64 vmsSqrt_64 of MKL 2023 and later; the MKL 2022 of torch 2.4 has only the LP64
        # vmsSqrt, whose 32-bit count the C++ side keeps below 2**31 (it calls in pieces of 2**30).
        for name in ("vmsSqrt_64", "vmsSqrt"):
            fn = getattr(lib, name, None)
            if fn is not None:
                return ctypes.cast(fn, ctypes.c_void_p).value
    return None


def _matching_sqrt(lib: ctypes.CDLL) -> tuple[int | None, int]:
    """(MKL's address or None, SqrtMode) for the kernel's sqrt that equals torch.sqrt bit for bit.

    torch computes float32 sqrt on CPU with MKL's vmsSqrt where it was built with MKL (the x86
    wheels), and it is not correctly rounded: on the Zen 5 dev machine 16% of results are 1 ulp off.
    Tried in order: the arithmetic of MKL's generic kernel replayed in C++ (what MKL runs on AMD
    CPUs; cheapest), a call to MKL, the correctly rounded sqrt (torch without MKL). Each is checked
    on 2**16 values spread over 60 binades plus zeros, subnormals and huge values, the first that
    matches every bit is used; tests/test_cpu_kernel.py checks the choice over the whole range.
    """
    gen = torch.Generator().manual_seed(0)
    # float32 explicitly: the probe reads the buffers as float, whatever torch's default dtype is.
    x = torch.rand(2**16, generator=gen, dtype=torch.float32)
    x = x * torch.exp2(torch.randint(-30, 30, (2**16,), generator=gen).float())
    specials = torch.tensor([0.0, 1e-40, 1e-45, 1.17e-38, 3.0e38, 3.4e38, 1.0, 2.0, 4.0], dtype=torch.float32)
    # Two batches: with the specials (which send a whole call of the replay to MKL) and without
    # them (every value on the replay's own path, which is the step's usual case).
    batches = [torch.cat([x, specials]), x[(x >= 2**-126) & (x <= 3.0e38)]]
    mkl = _mkl_sqrt()
    candidates = [(mkl, _SQRT_RSQRT), (mkl, _SQRT_MKL)] if mkl is not None else []
    for address, mode in [*candidates, (None, _SQRT_IEEE)]:
        matches = True
        for batch in batches:
            out = torch.empty_like(batch)
            lib.microadam_sqrt_probe(batch.data_ptr(), out.data_ptr(), batch.numel(), address, mode)
            matches = matches and torch.equal(out.view(torch.int32), batch.sqrt().view(torch.int32))
        if matches:
            return address, mode
    raise RuntimeError(
        "impl='cpp' cannot reproduce this torch build's float32 sqrt (neither MKL's vmsSqrt nor the "
        "correctly rounded sqrt match torch.sqrt), so it would not match impl='torch' bit for bit"
    )


def _load() -> tuple[ctypes.CDLL, tuple[int | None, int]]:
    """Build on first use and load the library, and pick its sqrt; raises RuntimeError saying why it cannot."""
    compiler = shutil.which(_COMPILER)
    if compiler is None:
        raise RuntimeError(f"impl='cpp' needs the C++ compiler {_COMPILER!r} on PATH, and none was found")
    try:
        source = _SOURCE.read_bytes()
    except OSError as e:
        raise RuntimeError(f"impl='cpp' cannot read its source {_SOURCE} ({e}); reinstall microadam") from e
    attempts: list[tuple[tuple[str, ...], str]] = []
    native = _native_target(compiler)
    if native is not None:
        attempts.append((_FLAGS + _NATIVE, native))
    attempts.append((_FLAGS, ""))
    errors = []
    for flags, key_extra in attempts:
        try:
            path = _build(compiler, flags, key_extra, source)
            lib = ctypes.CDLL(str(path))
        except RuntimeError as e:
            errors.append(f"{compiler} {' '.join(flags)} failed with {e}")
            continue
        except OSError as e:  # an unwritable cache, or a library the loader refuses
            errors.append(f"{e} (XDG_CACHE_HOME chooses the cache directory, now {_cache_dir()})")
            continue
        _declare(lib)
        return lib, _matching_sqrt(lib)
    raise RuntimeError(f"impl='cpp' could not compile {_SOURCE.name}: " + "\n".join(errors))


def _library() -> tuple[ctypes.CDLL, tuple[int | None, int]]:
    """The loaded library and how it computes torch's sqrt: (MKL's address, SqrtMode). Built once per process."""
    with _lock:
        if not _state:
            try:
                _state["lib"] = _load()
            except RuntimeError as e:
                _state["error"] = str(e)
        if "error" in _state:
            raise RuntimeError(f"{_state['error']}; {_FIX}")
        return _state["lib"]  # type: ignore[return-value]


def loaded() -> bool:
    """Whether the library is built and loaded in this process already (builds nothing)."""
    return "lib" in _state


def available() -> tuple[bool, str]:
    """``(True, "")`` once the library is built and loaded, else ``(False, why, and impl='torch' as the fix)``.

    The first call compiles (about 1 s; cached per user afterwards). The step itself also needs CPU
    tensors: :func:`microadam_step_cpp` raises ``ValueError`` for others.
    """
    try:
        _library()
    except RuntimeError as e:
        return False, str(e)
    return True, ""


@functools.lru_cache(maxsize=64)
def _ring_arrays(
    slots: tuple[int, ...], w1: tuple[float, ...], w2: tuple[float, ...]
) -> tuple[tuple[ctypes.Array, ctypes.Array, ctypes.Array], tuple[int, int, int]]:
    """The ring's slots and weights of a step (:class:`~microadam.functional.StepScalars`) as C arrays,
    and their addresses.

    ctypes rounds a Python float to float32 to nearest, as ``torch.tensor(..., dtype=float32)`` does
    in the torch path. Cached: every parameter of a step asks for the same ones.
    """
    arrays = (
        (ctypes.c_int64 * len(slots))(*slots),
        (ctypes.c_float * len(w1))(*w1),
        (ctypes.c_float * len(w2))(*w2),
    )
    return arrays, (ctypes.addressof(arrays[0]), ctypes.addressof(arrays[1]), ctypes.addressof(arrays[2]))


@functools.lru_cache(maxsize=256)
def _layout_facts(layout: Layout) -> tuple[tuple[torch.Size, ...], int]:
    """The state's shapes for ``layout`` (window indices, window values, codes, bounds) and the C++
    code's unit of work: whole Top-K blocks, whole quantization blocks, whole code bytes."""
    # torch.Size: the per-step check compares it with tensor.shape directly.
    shapes = tuple(torch.Size(s) for s in functional.state_shapes(layout).values())
    # One unit covers a tensor that is shorter than it (rounded up to whole code bytes): a tensor
    # smaller than block_size is one block of numel elements, and lcm(numel, quant_block, 2) can be
    # thousands of times numel (4095 elements at the defaults: 524160), which every thread's scratch
    # would be sized to and keep.
    n = layout.numel
    return shapes, min(math.lcm(layout.block, layout.quant_block, 2), n + n % 2)


@dataclass(frozen=True, slots=True)
class _Static:
    """The part of one tensor's step that is the same every step (see _prepare)."""

    head: bytes  # the StepArgs' fields before ``grad``
    layout: Layout  # held, so that its id in the cache key stays its own
    n: int
    unit: int
    block: int
    qblock: int
    release: bool
    keys: bool  # whether the step rounds stochastically and needs the random stream keys


# fingerprint -> _Static. Every input of _static is in the fingerprint (the addresses included: a new
# tensor at a reused address gets the same head, which is then right for it too), so an entry is never
# stale, only unused; the dict is emptied when full rather than tracking which.
_STATICS: dict[tuple, _Static] = {}
_MAX_STATICS = 1 << 16  # tensors; a mixture-of-experts model may have tens of thousands


def _static(
    param: torch.Tensor,
    grad_code: int,
    states: tuple[torch.Tensor, ...],
    layout: Layout,
    position_offset: int,
    weight_decay: bool,
    error_rounding: str,
    stochastic_param_rounding: bool,
    release: bool,
) -> _Static:
    """The steady fields of a tensor's row for contiguous ``param`` and ``states`` (checked by _prepare)."""
    _, unit = _layout_facts(layout)
    stochastic_error = error_rounding == "stochastic"
    stochastic_param = bool(stochastic_param_rounding) and param.dtype == torch.bfloat16
    a = _StepArgs()
    a.param = param.data_ptr()
    a.win_idx, a.win_val, a.codes, a.bounds = (t.data_ptr() for t in states)
    a.n, a.block, a.k, a.qblock, a.num_blocks = (
        layout.numel,
        layout.block,
        layout.k,
        layout.quant_block,
        layout.num_blocks,
    )
    a.unit, a.position_offset = unit, position_offset
    a.param_dtype, a.grad_dtype = _DTYPE_CODES[param.dtype], grad_code
    a.weight_decay, a.release = int(weight_decay), int(release)
    a.stochastic_error, a.stochastic_param = int(stochastic_error), int(stochastic_param)
    return _Static(
        head=bytes(a)[:_GRAD_AT],
        layout=layout,
        n=layout.numel,
        unit=unit,
        block=layout.block,
        qblock=layout.quant_block,
        release=release,
        keys=stochastic_error or stochastic_param,
    )


@functools.lru_cache(maxsize=256)
def _step_part(
    step: int,
    window: int,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    release: float,
    release_scale: float,
    signs: tuple[float, float, float],
) -> tuple[bytes, tuple[ctypes.Array, ctypes.Array, ctypes.Array]]:
    """The fields after ``grad`` and before the keys, which every tensor of a param group shares in a
    step, and the ring arrays they point into (to be kept alive while a row points at them).

    Cached: every tensor of a step asks for the same. The cache compares -0.0 equal to 0.0, hence
    ``signs``: those of ``lr``, ``eps`` and ``release_scale``, whose zero's sign the step can show
    (the torch path's ``p - (-0.0) * u`` differs from ``p - 0.0 * u`` in a zero's sign).
    """
    del signs
    if step < 1:
        raise ValueError(f"step must be >= 1 (the count after this step), got {step}")
    sc = functional.step_scalars(
        step=step,
        window=window,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        seed=0,
        param_index=0,
        release=release,
        keys=False,
    )
    ring, ring_addresses = _ring_arrays(sc.slots, sc.w1, sc.w2)
    a = _StepArgs()
    a.slot_of_age, a.w1, a.w2 = ring_addresses
    a.n_slots, a.write_slot = len(sc.slots), sc.write_slot
    a.lr, a.c1, a.c2, a.eps, a.decay = lr, sc.c1, sc.c2, eps, sc.decay
    a.keep, a.release_scale = sc.keep, release_scale
    return bytes(a)[_SHARED_AT:_KEYS_AT], ring


def _check_states(layout: Layout, states: tuple[torch.Tensor, ...]) -> None:
    """Raise if a state tensor's dtype or shape is not ``layout``'s: the C++ side indexes raw pointers,
    and a wrong dtype or shape would have it write out of bounds."""
    shapes, _ = _layout_facts(layout)
    window_indices, window_values, error_codes, error_bounds = states
    if not (
        window_indices.dtype is torch.int16
        and window_values.dtype is torch.bfloat16
        and error_codes.dtype is torch.uint8
        and error_bounds.dtype is torch.bfloat16
        and window_indices.shape == shapes[0]
        and window_values.shape == shapes[1]
        and error_codes.shape == shapes[2]
        and error_bounds.shape == shapes[3]
    ):
        functional.check_state(
            layout,
            window_indices=window_indices,
            window_values=window_values,
            error_codes=error_codes,
            error_bounds=error_bounds,
        )


@dataclass(slots=True)
class _Pending:
    """One tensor's step, checked and ready for the C++ call, and what to do after it."""

    row: bytes | None  # its StepArgs; None: a float64 parameter, stepped by ``torch_step``
    static: _Static | None
    param: torch.Tensor
    work_param: torch.Tensor  # param itself, or its contiguous copy to write back
    copy_back: list[tuple[torch.Tensor, torch.Tensor]]  # (state tensor, its contiguous copy)
    keep: list[object]  # what the raw pointers point into: alive until the call returns
    torch_step: Callable[[], None] | None = None


def _prepare(
    param: torch.Tensor,
    grad: torch.Tensor,
    *,
    window_indices: torch.Tensor,
    window_values: torch.Tensor,
    error_codes: torch.Tensor,
    error_bounds: torch.Tensor,
    layout: Layout,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    error_rounding: str,
    stochastic_param_rounding: bool,
    seed: int,
    param_index: int,
    chunk_size: int = functional.DEFAULT_CHUNK,
    position_offset: int = 0,
    release: float = 0.0,
    release_scale: float = 1.0,
) -> _Pending | None:
    """Check one tensor's arguments and build its ``StepArgs`` row; None if there is nothing for C++ to do.

    Writes nothing: a float64 parameter's step by the torch path is deferred to ``torch_step``.
    """
    # This runs per tensor and step: for a model of hundreds of small tensors its Python time is most
    # of the step (benchmarks/step_time.py, 200 tensors of 384), hence is_cpu rather than device.type,
    # one boolean expression per kind of check, the state's expected shapes cached per layout (each
    # check fails into a detailed message), and the row built from cached parts: what stays the same
    # between steps per tensor (_static), what a step shares among tensors (_step_part).
    if not (
        param.is_cpu
        and grad.is_cpu
        and window_indices.is_cpu
        and window_values.is_cpu
        and error_codes.is_cpu
        and error_bounds.is_cpu
    ):
        names = ("param", "grad", "window_indices", "window_values", "error_codes", "error_bounds")
        tensors = (param, grad, window_indices, window_values, error_codes, error_bounds)
        name, t = next((nm, t) for nm, t in zip(names, tensors) if not t.is_cpu)
        raise ValueError(f"impl='cpp' runs on CPU tensors, but {name} is on {t.device}; use impl='torch'")
    n = layout.numel
    if param.numel() != n or grad.numel() != n:
        raise ValueError(
            f"param ({param.numel()} elements) and grad ({grad.numel()}) must both have layout.numel = {n} elements"
        )
    # _step_part checks step, _check_states the state's dtypes and shapes (on a path that
    # does not find them in the fingerprint).
    if error_rounding not in _ERROR_ROUNDINGS:
        raise ValueError(f"Invalid error_rounding: {error_rounding!r}; use 'nearest' or 'stochastic'")
    states = (window_indices, window_values, error_codes, error_bounds)
    if math.copysign(1.0, beta2) < 0:
        # Here, not in the cached _step_part: -0.0 finds the entry of +0.0 there. The C++ step marks a
        # position not yet seen by the sign bit of its second-moment sum, which starts at -0 and turns +0
        # or positive at the first term: that needs terms (v * v) * beta2**age >= +0. MicroAdam refuses
        # such betas; the functional API's torch path takes them.
        raise ValueError(f"impl='cpp' needs beta2 >= +0 (not -0.0 or negative), got {beta2!r}; use impl='torch'")
    # Plain floats for the cache key: a tensor lr (hashed by identity) could change in place, and a
    # NumPy array is not hashable.
    lr, eps, release_scale = float(lr), float(eps), float(release_scale)
    shared, ring = _step_part(
        step,
        layout.window,
        float(beta1),
        float(beta2),
        lr,
        float(weight_decay),
        eps,
        float(release),
        release_scale,
        (math.copysign(1.0, lr), math.copysign(1.0, eps), math.copysign(1.0, release_scale)),
    )
    if param.dtype not in _DTYPE_CODES or n == 0:
        _check_states(layout, states)
    if param.dtype not in _DTYPE_CODES:
        # float64 is the oracle's precision: the torch path is the reference for it, and the C++
        # code computes in float32 only.
        torch_step = functools.partial(
            functional.step_in_place,
            param,
            grad,
            window_indices=window_indices,
            window_values=window_values,
            error_codes=error_codes,
            error_bounds=error_bounds,
            layout=layout,
            step=step,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            error_rounding=error_rounding,
            stochastic_param_rounding=stochastic_param_rounding,
            seed=seed,
            param_index=param_index,
            chunk_size=chunk_size,
            impl="torch",
            position_offset=position_offset,
            release=release,
            release_scale=release_scale,
        )
        return _Pending(
            row=None, static=None, param=param, work_param=param, copy_back=[], keep=[], torch_step=torch_step
        )
    if n == 0:
        return None

    # A gradient of another dtype is rounded to float32 first, which is what the torch path's
    # g.to(float32) does.
    g = grad if grad.dtype in _DTYPE_CODES else grad.to(torch.float32)
    g = g.contiguous()
    grad_code = _DTYPE_CODES[g.dtype]
    if (
        param.is_contiguous()
        and window_indices.is_contiguous()
        and window_values.is_contiguous()
        and error_codes.is_contiguous()
        and error_bounds.is_contiguous()
    ):
        p, work, copy_back = param, states, []
        # state_key holds the state's dtypes and shapes, so that a hit has passed _check_states.
        fingerprint = (
            param.data_ptr(),
            param.dtype,
            grad_code,
            state_key(window_indices, window_values, error_codes, error_bounds),
            id(layout),
            position_offset,
            weight_decay != 0,
            error_rounding,
            bool(stochastic_param_rounding),
            release != 0,
        )
        st = _STATICS.get(fingerprint)
        if st is None or st.layout is not layout:
            _check_states(layout, states)
            st = _static(
                p, grad_code, work, layout, position_offset, weight_decay != 0, error_rounding,
                stochastic_param_rounding, release != 0,
            )  # fmt: skip
            if len(_STATICS) >= _MAX_STATICS:
                _STATICS.clear()
            _STATICS[fingerprint] = st
    else:
        # Work on contiguous copies, new each step (so not cached); what was copied is copied back at
        # the end, as the torch path does for a non-contiguous parameter.
        p = param if param.is_contiguous() else param.contiguous()
        _check_states(layout, states)
        work = tuple(t if t.is_contiguous() else t.contiguous() for t in states)
        copy_back = [(orig, copy) for orig, copy in zip(states, work) if copy is not orig]
        st = _static(
            p, grad_code, work, layout, position_offset, weight_decay != 0, error_rounding,
            stochastic_param_rounding, release != 0,
        )  # fmt: skip
    keys = (
        _KEYS.pack(stream_key(seed, param_index, step, STREAM_ERROR), stream_key(seed, param_index, step, STREAM_PARAM))
        if st.keys
        else _NO_KEYS
    )
    return _Pending(
        row=b"".join((st.head, _ADDRESS.pack(g.data_ptr()), shared, keys)),
        static=st,
        param=param,
        work_param=p,
        copy_back=copy_back,
        keep=[p, g, *work, ring],
    )


def _step_all(pending: list[_Pending | None]) -> None:
    """Step every pending tensor: the C++ ones in one call (one parallel region), then float64 ones
    by the torch path; then write copies back. ``None`` entries (empty tensors) need nothing.

    Raises :class:`~microadam.kernels.PartialStepError` naming the positions in ``pending`` not
    stepped when some tensors' state turned out corrupt (the others were stepped).
    """
    cpp = [(i, x) for i, x in enumerate(pending) if x is not None and x.row is not None]
    failed: list[int] = []
    if cpp:
        lib, (sqrt_fn, sqrt_mode) = _library()
        count = len(cpp)
        items = (_StepArgs * count).from_buffer_copy(b"".join(x.row for _, x in cpp))  # type: ignore[misc]
        bad = (ctypes.c_int32 * count)()
        total = sum(x.static.n for _, x in cpp)  # type: ignore[union-attr]
        threads = max(1, min(torch.get_num_threads(), total // _GRAIN))
        nbad = lib.microadam_step_cpu_multi(count, items, bad, sqrt_fn, sqrt_mode, threads)
        if nbad < 0:
            unit = max(x.static.unit for _, x in cpp)  # type: ignore[union-attr]
            # The unit's copy and codes (5 bytes an element), a Top-K block's buffers (about 21 bytes an
            # element) and, with release, a quantization block's squares padded to a power of two.
            need = max(
                5 * x.static.unit + 21 * x.static.block + (8 * x.static.qblock if x.static.release else 0)  # type: ignore[union-attr]
                for _, x in cpp
            )
            raise MemoryError(
                f"impl='cpp' could not allocate its per-thread scratch (about {need / 1e6:.1f} MB a thread for "
                f"units of {unit} elements, lcm(block_size, quant_block_size, 2)); nothing was written. "
                "Free memory, use fewer threads (torch.set_num_threads), a quant_block_size that divides "
                "block_size, or impl='torch'"
            )
        if nbad:
            failed = [cpp[j][0] for j in range(count) if bad[j]]
    for x in pending:
        if x is not None and x.torch_step is not None:
            x.torch_step()
    for _, x in cpp:
        for orig, copy in x.copy_back:
            orig.copy_(copy)
        if x.work_param is not x.param:
            x.param.copy_(x.work_param.view(x.param.shape))
        else:
            # Raw-pointer writes bypass autograd's version counter; bump it as an in-place op would, so
            # a graph that saved the parameter notices the update.
            torch.autograd.graph.increment_version(x.param)
    if failed:
        raise PartialStepError(
            f"window_indices of tensor(s) {failed} of this call hold an index outside its Top-K block: the "
            "optimizer state is corrupt (loaded from a checkpoint of another layout?); the call's other "
            "tensors were stepped",
            failed,
        )


def microadam_step_cpp(
    param: torch.Tensor,
    grad: torch.Tensor,
    *,
    window_indices: torch.Tensor,
    window_values: torch.Tensor,
    error_codes: torch.Tensor,
    error_bounds: torch.Tensor,
    layout: Layout,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    error_rounding: str,
    stochastic_param_rounding: bool,
    seed: int,
    param_index: int,
    chunk_size: int = functional.DEFAULT_CHUNK,
    position_offset: int = 0,
    release: float = 0.0,
    release_scale: float = 1.0,
) -> None:
    """One MicroAdam step on CPU tensors, in place; the arguments of :func:`~microadam.functional.microadam_step`.

    Same results, bit for bit, as ``impl="torch"`` for float32, bfloat16 and float16 parameters;
    float64 parameters run the torch path. ``chunk_size`` has no effect here: the C++ code works
    on one unit of ``lcm(block, quant_block, 2)`` elements at a time per thread, in scratch kept per
    thread across calls (about 110 KB at the default layout), and makes no full-size temporaries
    except a contiguous copy of a non-contiguous parameter or gradient, as the torch path does.
    Threads: ``torch.get_num_threads()``, in torch's own OpenMP pool, one per 32768 elements at most.
    """
    pending = _prepare(
        param,
        grad,
        window_indices=window_indices,
        window_values=window_values,
        error_codes=error_codes,
        error_bounds=error_bounds,
        layout=layout,
        step=step,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        error_rounding=error_rounding,
        stochastic_param_rounding=stochastic_param_rounding,
        seed=seed,
        param_index=param_index,
        chunk_size=chunk_size,
        position_offset=position_offset,
        release=release,
        release_scale=release_scale,
    )
    _step_all([pending])


def microadam_step_cpp_multi(steps: Sequence[Mapping[str, Any]]) -> None:
    """Many :func:`microadam_step_cpp` calls in one: one C++ call and one parallel region for all.

    Each item holds the arguments of one call by name (``param``, ``grad`` and the keyword
    arguments), as :func:`microadam.kernels.triton_kernels.microadam_step_triton_multi` takes them.
    Every item is checked before any is stepped, so a bad argument changes nothing (a corrupt state,
    found while stepping, raises :class:`~microadam.kernels.PartialStepError`). The units of
    all tensors are shared out among the threads together: a model's many small tensors (biases,
    norms) cost neither a call each nor a thread each.
    """
    run_prepared(prepare_many(steps))


def prepare_many(steps: Sequence[Mapping[str, Any]]) -> list[_Pending | None]:
    """The first phase of :func:`microadam_step_cpp_multi`: every item checked and its C++ arguments
    built; nothing is written (a non-contiguous tensor's contiguous copy is made here)."""
    return prepare_each(_prepare, steps)


def run_prepared(pending: list[_Pending | None]) -> None:
    """The second phase of :func:`microadam_step_cpp_multi`: step what :func:`prepare_many` built."""
    _step_all(pending)


def grads_in_range(grads: Sequence[torch.Tensor], limit: float) -> bool:
    """Whether every tensor's float32 sum of absolute values is at most ``limit``, in one C++ call:
    ``optimizer.grads_in_range``'s check for contiguous CPU tensors of float32, bfloat16 or float16
    (``ValueError`` for others).

    Every element is at most that sum, and a NaN or Inf anywhere makes it NaN or Inf, so True means
    every element is finite and within ``limit``. False may also be elements within the limit whose
    sum is not (the optimizer then checks element by element). The torch path's check is a
    reduction per tensor: for a model of hundreds of small tensors that is most of its cost, here
    one parallel region.
    """
    native, rest = native_range_args(grads)
    if rest:
        g = rest[0]
        i = next(j for j, x in enumerate(grads) if x is g)
        raise ValueError(
            f"grads_in_range takes contiguous CPU tensors of float32, bfloat16 or float16; tensor {i} is a "
            f"{'contiguous' if g.is_contiguous() else 'non-contiguous'} {g.dtype} tensor on {g.device}; "
            "use optimizer.grads_in_range, which takes any"
        )
    return in_range_native(native, limit)


def native_range_args(
    grads: Sequence[torch.Tensor],
) -> tuple[tuple[list[int], list[int], list[int]], list[torch.Tensor]]:
    """The C++ check's arguments for the contiguous CPU float32/bfloat16/float16 tensors of ``grads``
    (addresses, sizes and dtype codes of the non-empty ones), and the other tensors, in one pass."""
    ptrs: list[int] = []
    numels: list[int] = []
    codes: list[int] = []
    rest: list[torch.Tensor] = []
    for g in grads:
        code = _DTYPE_CODES.get(g.dtype)
        if code is not None and g.is_cpu and g.is_contiguous():
            n = g.numel()
            if n:
                ptrs.append(g.data_ptr())
                numels.append(n)
                codes.append(code)
        else:
            rest.append(g)
    return (ptrs, numels, codes), rest


def in_range_native(args: tuple[list[int], list[int], list[int]], limit: float) -> bool:
    """The C++ check on :func:`native_range_args`'s arguments (builds the library if needed)."""
    ptrs, numels, codes = args
    count = len(ptrs)
    if not count:
        return True
    lib, _ = _library()
    threads = max(1, min(torch.get_num_threads(), sum(numels) // _GRAIN))
    return bool(
        lib.microadam_grads_in_range(
            count,
            (ctypes.c_void_p * count)(*ptrs),
            (ctypes.c_int64 * count)(*numels),
            (ctypes.c_int32 * count)(*codes),
            limit,
            threads,
        )
    )
