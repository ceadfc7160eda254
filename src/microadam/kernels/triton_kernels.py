"""Fused Triton kernels for one MicroAdam step: ``impl="triton"``.

Two kernels per step, each launched once for a batch of tensors that share a tile shape:

1. ``_compress_kernel``, one program per *group* of whole Top-K blocks and whole quantization
   blocks (``lcm(block, quant_block, 2)`` elements, as :func:`microadam.functional.chunk_elements`):
   ``a = g + dequant(e)``; exact Top-K of ``|a|`` per block with the tie rule of
   :func:`microadam.ops.topk.block_topk` (a radix select over the float bits, lower index wins);
   the selection is written to the ring slot of this step in ascending index order; the rest is
   re-quantized to 4 bits (nearest or stochastic) and packed two codes per byte. With released
   error feedback (``release > 0``, the default variant) it first moves the parameter by the
   released part, ``p * (1 - lr * wd) - lr * rest * release_scale / rms(rest)`` per quantization
   block (the sum of squares by halving, as :func:`microadam.functional.release_move`), and
   quantizes ``(1 - release) * rest``.
2. ``_update_kernel``, one program per Top-K block: the first and second moments at every
   position held in the window (``sum_s beta^age * v_s``, summed in age order like the torch path
   on CPU and the reference), ``u = c1 * M / (sqrt(c2 * S) + eps)``, then
   ``p = p * (1 - lr * wd) - lr * u`` rounded into the parameter's dtype (bf16 optionally
   stochastically, with the same counter-based bits as :func:`microadam.ops.random.hash_bits`);
   with release ``p - lr * u`` (the decay came with the dense move). A float32 parameter gets the
   torch path's arithmetic in its order; a bfloat16/float16 one is rounded twice at the window's
   positions (after the move, after ``u``), where the torch path rounds once: within two roundings
   of it (``tests/test_triton_kernels.py`` checks the bound each step).

Every operation is the torch path's, in the same order and precision (float32): divisions and
square roots are the correctly rounded ``div_rn``/``sqrt_rn``, and multiply-adds are not fused into
FMAs (``enable_fp_fusion=False``), because torch rounds each of them separately. The state
(window, codes, bounds) therefore matches the torch path bit for bit, and so do the parameters
wherever torch's own ``sqrt`` is correctly rounded (CUDA; torch's vectorized CPU ``sqrt`` is not,
which leaves an ulp of float32 here and there: ``tests/test_triton_kernels.py``).

Per-tensor numbers (sizes, step, hyperparameters, pointers) travel in small tables, so one launch
serves many tensors (:func:`microadam_step_triton_multi`) and a tensor's size never triggers a
recompilation; only the tile shape (powers of two) and the dtypes are compile-time constants.

On a machine without a GPU the kernels run on CPU tensors in Triton's interpreter when
``TRITON_INTERPRET=1`` is set before this module is imported (slow: for tests). That needs Triton
>= 3.8 with NumPy 2: the interpreter of 3.6 cannot use a loaded value as a loop bound there.
"""

# Triton reads the annotations of jit-function parameters (tl.constexpr and type strings), so the
# kernels and their helpers leave tensors unannotated; every host-side function is annotated.
# ruff: noqa: ANN001, ANN202

from __future__ import annotations

import array
import functools
import itertools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from microadam.functional import StepScalars, check_state, step_scalars
from microadam.kernels import prepare_each, state_key, triton_layout_error
from microadam.layout import Layout
from microadam.ops.random import STREAM_ERROR, STREAM_MOVE, STREAM_PARAM, _mix32_cached, _mix32_int, _param_key

try:
    import triton
    import triton.language as tl
except ImportError as _e:  # the optional extra is missing; available() says how to fix it
    triton = None
    tl = None
    _IMPORT_ERROR: ImportError | None = _e
else:
    _IMPORT_ERROR = None

__all__ = ["available", "microadam_step_triton", "microadam_step_triton_multi", "prepare_many", "run_prepared"]

_PARAM_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_GRAD_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}

# Columns of the per-tensor tables; constexpr so that the kernels can name them too.
_col = tl.constexpr if triton is not None else int
# integers (int64)
_I_N, _I_B, _I_K, _I_Q, _I_NB, _I_C, _I_R, _I_S, _I_G = (_col(i) for i in range(9))
_I_SLOT, _I_VALID, _I_M, _I_PKEY, _I_STEPMIX, _I_OFFSET, _I_STOCH_ERR, _I_STOCH_PAR, _I_WD = (
    _col(i) for i in range(9, 18)
)
_I_PARAM, _I_GRAD, _I_WIDX, _I_WVAL, _I_CODES, _I_BOUNDS = (_col(i) for i in range(18, 24))
# The random streams' keys are computed in the kernels from ops.random.stream_key's cached parts: the
# tensor's key (PKEY), the step's mix (STEPMIX) and the stream's mix (a constant below, or for the
# update kernel's parameter stream this column: see _static); a Python hash per tensor and step
# would cost more host time than the rest of its row.
_I_UPDATE_STREAM = _col(24)
_NI = _col(25)
# floats (float32: torch rounds a Python scalar to the tensor's float32 before multiplying, so the
# kernel must see the same float32 numbers)
_F_LR, _F_DECAY, _F_C1, _F_C2, _F_EPS = (_col(i) for i in range(5))
# Release: the compress kernel's weight-decay factor (the update kernel's is then 1), what stays in
# the error feedback (1 - release), and the move's RMS in units of lr.
_F_CDECAY, _F_KEEP, _F_RSCALE = (_col(i) for i in range(5, 8))
_NF = _col(8)
# The compress kernel's two random streams (ops.random), mixed as stream_key mixes them.
_MIX_ERROR = _col(_mix32_int(STREAM_ERROR))
_MIX_PARAM = _col(_mix32_int(STREAM_PARAM))


def available() -> tuple[bool, str]:
    """``(True, "")`` if the Triton kernels can run here, else ``(False, what is missing and the fix)``."""
    if _IMPORT_ERROR is not None:
        return False, (
            f"impl='triton' needs the triton package ({_IMPORT_ERROR}); install it with `pip install triton`, "
            "or use impl='torch'"
        )
    if _INTERPRETED or torch.cuda.is_available():
        return True, ""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False, (
            "impl='triton': TRITON_INTERPRET=1 was set after microadam.kernels.triton_kernels was imported; "
            "set it before importing microadam (or use impl='torch')"
        )
    return False, (
        "impl='triton' needs a CUDA device (or TRITON_INTERPRET=1, set before importing microadam, to run the "
        "kernels on CPU tensors in Triton's slow interpreter); use impl='torch' on this machine"
    )


if triton is not None:
    # ------------------------------------------------------------------ jit helpers

    # tl.sum/min/max/cumsum are jit functions that call tl.reduce/tl.associative_scan with these
    # combine functions. Calling those directly compiles to the same code, and in the interpreter
    # it skips a re-patching of triton.language on every jit-function call (about 0.7 ms each,
    # measured with cProfile: in the rounds of the radix select that was most of the run time).
    # For the same reason the loops below inline their helpers. And tl.full, not tl.zeros (a jit
    # function too): a triton.language imported before TRITON_INTERPRET was set (by another library,
    # as in a full test run) holds compiled jit functions, which an interpreted kernel cannot call.
    _SUM = getattr(tl.standard, "_sum_combine", None)
    _MIN = getattr(tl.standard, "_elementwise_min", None)
    _MAX = getattr(tl.standard, "_elementwise_max", None)
    if _SUM is None or _MIN is None or _MAX is None:  # a Triton that renamed them: same math, slower interpreter

        @triton.jit
        def _SUM(a, b):  # noqa: N802
            return a + b

        @triton.jit
        def _MIN(a, b):  # noqa: N802
            return tl.minimum(a, b)

        @triton.jit
        def _MAX(a, b):  # noqa: N802
            return tl.maximum(a, b)

    @triton.jit
    def _bf16_round(x, up):
        """Bits (uint32 < 2**16) of the bf16 next to float32 ``x`` downward (up=0) or upward (up=1).

        ops.quant.bf16_floor / bf16_ceil: round to nearest even, then step one bf16 ulp if that
        went the wrong way.
        """
        u = x.to(tl.uint32, bitcast=True)
        b = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        y = (b << 16).to(tl.float32, bitcast=True)
        neg = (b & 0x8000) != 0
        zero = (b & 0x7FFF) == 0
        down = tl.where(zero, 0x8001, tl.where(neg, b + 1, b - 1))
        upw = tl.where(zero, 0x0001, tl.where(neg, b - 1, b + 1))
        return tl.where(up != 0, tl.where(y < x, upw, b), tl.where(y > x, down, b))

    @triton.jit
    def _seg_sum(x, seg, MODE: tl.constexpr):
        """Per row of ``x`` [R, C]: the sum over the row's block (MODE 0: the row; 1: the tile; 2: its half)."""
        rs = tl.reduce(x, 1, _SUM)
        if MODE == 0:
            out = rs
        elif MODE == 1:
            out = rs * 0 + tl.reduce(rs, 0, _SUM)
        else:
            s0 = tl.reduce(tl.where(seg == 0, rs, 0), 0, _SUM)
            s1 = tl.reduce(tl.where(seg == 1, rs, 0), 0, _SUM)
            out = tl.where(seg == 0, s0, s1)
        return out

    @triton.jit
    def _seg_cumsum(x, seg, MODE: tl.constexpr):
        """Inclusive prefix sum of ``x`` [R, C] in flat (row-major) order within each block."""
        cs = tl.associative_scan(x, 1, _SUM)
        if MODE == 0:
            out = cs
        else:
            rs = tl.reduce(x, 1, _SUM)
            before = tl.associative_scan(rs, 0, _SUM) - rs
            if MODE == 2:
                base = tl.reduce(tl.where(seg == 0, rs, 0), 0, _SUM)
                before = tl.where(seg == 1, before - base, before)
            out = cs + before[:, None]
        return out

    @triton.jit
    def _seg_min_max(x, valid, seg, MODE: tl.constexpr):
        """(min, max) of ``x`` over the valid entries of each row's block, per row."""
        lo = tl.reduce(tl.where(valid, x, float("inf")), 1, _MIN)
        hi = tl.reduce(tl.where(valid, x, -float("inf")), 1, _MAX)
        if MODE == 1:
            lo = tl.broadcast_to(tl.reduce(lo, 0, _MIN), lo.shape)
            hi = tl.broadcast_to(tl.reduce(hi, 0, _MAX), hi.shape)
        elif MODE == 2:
            lo = tl.where(
                seg == 0,
                tl.reduce(tl.where(seg == 0, lo, float("inf")), 0, _MIN),
                tl.reduce(tl.where(seg == 1, lo, float("inf")), 0, _MIN),
            )
            hi = tl.where(
                seg == 0,
                tl.reduce(tl.where(seg == 0, hi, -float("inf")), 0, _MAX),
                tl.reduce(tl.where(seg == 1, hi, -float("inf")), 0, _MAX),
            )
        return lo, hi

    @triton.jit
    def _mix32(x):
        """ops.random._mix32_int of uint32 ``x`` in uint32 arithmetic (the int64-with-masks original wraps
        the same way)."""
        x = x ^ (x >> 16)
        x = x * 0x045D9F3B
        x = x ^ (x >> 16)
        x = x * 0x045D9F3B
        return x ^ (x >> 16)

    @triton.jit
    def _hash_bits(pos, key):
        """ops.random.hash_bits."""
        return _mix32(((pos + key) & 0xFFFFFFFF).to(tl.uint32))

    @triton.jit
    def _stream_key(pkey, step_mix, stream_mix):
        """ops.random.stream_key from its parts, as int64: the tensor's key and the step's mix as int64
        values below 2**32, the stream's mix a uint32 or a constant."""
        key = _mix32((pkey ^ step_mix).to(tl.uint32))
        return _mix32(key ^ stream_mix).to(tl.int64)

    @triton.jit
    def _round_param(x, pos, par_key, stoch, PARAM_KIND: tl.constexpr):
        """ops.rounding.round_to_dtype of float32 ``x`` into the stored form of the parameter."""
        if PARAM_KIND == 0:
            out = x
        elif PARAM_KIND == 1:
            u = x.to(tl.uint32, bitcast=True)
            if stoch != 0:
                # Raise the low 16 bits by 16 random bits and cut them off: unbiased rounding.
                b = (u + (_hash_bits(pos, par_key) & 0xFFFF)) >> 16
            else:
                b = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            out = b.to(tl.uint16).to(tl.int16, bitcast=True)
        else:
            out = x.to(tl.float16)
        return out

    @triton.jit
    def _typed_pointer(mi, COL: tl.constexpr, KIND: tl.constexpr):
        """Column COL of a tensor's table row (the parameter or the gradient) as a pointer to its stored
        form: KIND 0 float32, 1 bfloat16 (as int16), 2 float16, 3 float64 (_PARAM_KINDS, _GRAD_KINDS)."""
        if KIND == 0:
            ptr = tl.load(mi + COL).to(tl.pointer_type(tl.float32))
        elif KIND == 1:
            ptr = tl.load(mi + COL).to(tl.pointer_type(tl.int16))
        elif KIND == 2:
            ptr = tl.load(mi + COL).to(tl.pointer_type(tl.float16))
        else:
            ptr = tl.load(mi + COL).to(tl.pointer_type(tl.float64))
        return ptr

    @triton.jit
    def _load_param(ptr, mask, PARAM_KIND: tl.constexpr):
        if PARAM_KIND == 1:
            out = (tl.load(ptr, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(
                tl.float32, bitcast=True
            )
        else:
            out = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        return out

    # ------------------------------------------------------------------ kernels

    @triton.jit
    def _compress_kernel(
        prog_tensor,
        prog_local,
        meta_i,
        meta_f,
        RP2: tl.constexpr,
        CP2: tl.constexpr,
        TK_MODE: tl.constexpr,
        Q_MODE: tl.constexpr,
        PAIRS: tl.constexpr,
        GRAD_KIND: tl.constexpr,
        RADIX_BITS: tl.constexpr,
        RELEASE: tl.constexpr,
        PARAM_KIND: tl.constexpr,
        LOG_CP2: tl.constexpr,
        LOG_RP2: tl.constexpr,
    ):
        pid = tl.program_id(0)
        t = tl.load(prog_tensor + pid).to(tl.int64)
        g = tl.load(prog_local + pid).to(tl.int64)
        mi = meta_i + t * _NI
        n = tl.load(mi + _I_N)
        B = tl.load(mi + _I_B)
        k = tl.load(mi + _I_K).to(tl.int32)
        q = tl.load(mi + _I_Q)
        nb = tl.load(mi + _I_NB)
        C = tl.load(mi + _I_C)
        R = tl.load(mi + _I_R)
        S = tl.load(mi + _I_S)
        G = tl.load(mi + _I_G)
        write_slot = tl.load(mi + _I_SLOT)
        pkey = tl.load(mi + _I_PKEY)
        step_mix = tl.load(mi + _I_STEPMIX)
        err_key = _stream_key(pkey, step_mix, _MIX_ERROR)
        offset = tl.load(mi + _I_OFFSET)
        stoch_err = tl.load(mi + _I_STOCH_ERR)
        grad_ptr = _typed_pointer(mi, _I_GRAD, GRAD_KIND)
        widx_ptr = tl.load(mi + _I_WIDX).to(tl.pointer_type(tl.int16))
        wval_ptr = tl.load(mi + _I_WVAL).to(tl.pointer_type(tl.int16))
        codes_ptr = tl.load(mi + _I_CODES).to(tl.pointer_type(tl.uint8))
        bounds_ptr = tl.load(mi + _I_BOUNDS).to(tl.pointer_type(tl.int16))

        # The tile: rows of C elements; each row lies in one Top-K block and one quantization block.
        # Positions are int32 offsets ``o`` from the group's first element ``base`` (int64): a group
        # holds at most 2 * 32768 elements, and 32-bit tiles halve the registers of 64-bit ones.
        base = g * G
        rows = tl.arange(0, RP2)
        cols = tl.arange(0, CP2)
        row_off = rows * C.to(tl.int32)
        row_start = base + row_off
        o = row_off[:, None] + cols[None, :]
        n_here = tl.minimum(n - base, G).to(tl.int32)
        row_ok = rows < R
        in_tile = row_ok[:, None] & (cols[None, :] < C)
        in_data = in_tile & (o < n_here)
        grad_ptr += base
        codes_ptr += base // 2  # base is even: groups hold an even number of elements
        seg = (rows >= S).to(tl.int32)
        blk_r = row_start // B
        qid_r = row_start // q
        qrow_ok = row_ok & (row_start < n)

        # 1. a = g + dequant(e), in float32 like the torch path.
        byte = tl.load(codes_ptr + (o >> 1), mask=in_data, other=0).to(tl.int32)
        nib = (byte >> ((o & 1) * 4).to(tl.int32)) & 0xF
        lo_bits = tl.load(bounds_ptr + qid_r * 2, mask=qrow_ok, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
        hi_bits = tl.load(bounds_ptr + qid_r * 2 + 1, mask=qrow_ok, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
        lo_old = (lo_bits << 16).to(tl.float32, bitcast=True)
        hi_old = (hi_bits << 16).to(tl.float32, bitcast=True)
        scale_old = tl.div_rn(hi_old - lo_old, 15.0)
        err = nib.to(tl.float32) * scale_old[:, None] + lo_old[:, None]
        if GRAD_KIND == 1:
            gbits = tl.load(grad_ptr + o, mask=in_data, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
            gv = (gbits << 16).to(tl.float32, bitcast=True)
        else:
            gv = tl.load(grad_ptr + o, mask=in_data, other=0).to(tl.float32)
        a = tl.where(in_data, gv + err, 0.0)

        # 2. exact Top-K per block. A non-negative float's bits order like its value; +1 puts real
        # entries above 0, the key of a last block's padding (taken only after every real entry,
        # as block_topk's -1), and -1 marks positions outside any block.
        local = o - (blk_r * B - base).to(tl.int32)[:, None]
        tk_part = in_tile & (blk_r < nb)[:, None] & (local < B)
        key = tl.where(in_data, tl.abs(a).to(tl.int32, bitcast=True) + 1, 0)
        key = tl.where(tk_part, key, -1)
        # Radix select, RADIX_BITS bits per round from the top: the k-th largest key is the largest
        # threshold with at least k keys >= it. Each round counts the keys above all 2**RADIX_BITS
        # candidates at once (one reduction for several bits: 16 rounds instead of 31 at 2 bits).
        digits = tl.arange(0, 1 << RADIX_BITS)
        thr = tl.full([RP2], 0, tl.int32)
        for r in tl.static_range((31 + RADIX_BITS - 1) // RADIX_BITS):
            shift = 31 - RADIX_BITS * (r + 1)
            if shift < 0:  # the last round: fewer than RADIX_BITS bits left
                shift = 0
            cand = thr[:, None] + (digits << shift)[None, :]
            rs = tl.reduce((key[:, :, None] >= cand[:, None, :]).to(tl.int32), 1, _SUM)
            if TK_MODE == 0:
                cnt = rs
            elif TK_MODE == 1:
                cnt = rs * 0 + tl.reduce(rs, 0, _SUM)[None, :]
            else:
                s0 = tl.reduce(tl.where((seg == 0)[:, None], rs, 0), 0, _SUM)
                s1 = tl.reduce(tl.where((seg == 1)[:, None], rs, 0), 0, _SUM)
                cnt = tl.where((seg == 0)[:, None], s0[None, :], s1[None, :])
            # Counts fall as the candidate rises; candidate 0 (thr itself) always qualifies in a real
            # block, and the clamp keeps thr >= 0 in a row that holds none (count 0).
            digit = tl.maximum(tl.reduce((cnt >= k).to(tl.int32), 1, _SUM) - 1, 0)
            thr = thr + (digit << shift)
        above = key > thr[:, None]
        tie = key == thr[:, None]
        need = k - _seg_sum(above.to(tl.int32), seg, TK_MODE)
        # Ties at the k-th place: the lowest indices win (block_topk's rule).
        sel = above | (tie & (_seg_cumsum(tie.to(tl.int32), seg, TK_MODE) <= need[:, None]))
        # Slot entries in ascending index order, as block_topk returns them.
        entry = _seg_cumsum(sel.to(tl.int32), seg, TK_MODE) - 1
        slot_row = (write_slot * nb + blk_r) * k
        # Selections on a short last block's padding are stored as index 0, value 0.
        tl.store((widx_ptr + slot_row)[:, None] + entry, tl.where(in_data, local, 0).to(tl.int16), mask=sel)
        ua = a.to(tl.uint32, bitcast=True)
        vbits = tl.where(in_data, (ua + 0x7FFF + ((ua >> 16) & 1)) >> 16, 0)
        tl.store((wval_ptr + slot_row)[:, None] + entry, vbits.to(tl.uint16).to(tl.int16, bitcast=True), mask=sel)

        # 3. the rest is the new error: 4-bit codes per quantization block (ops.quant.quantize_blocks).
        rest = tl.where(sel, 0.0, a)
        if RELEASE:
            # Released error feedback (functional.release_move). The sum of squares of each
            # quantization block by halving, each level adding the two halves, as the torch path
            # does, so that the sum is bit-identical:
            # - Q_MODE 0: a row is a quantization block, padded with zeros to CP2 columns (the torch
            #   path pads to the power of two of the quantization block; more zero halves add exact
            #   zeros).
            # - Q_MODE 1: the group is one quantization block of RP2 rows of CP2 (_prepare requires
            #   both powers of two, so the tile is the block in index order): the rows' halves first
            #   (element i with i + RP2 * CP2 / 2, ...), then the one row's.
            mf = meta_f + t * _NF
            sq = rest * rest
            if Q_MODE == 0:
                for lvl in tl.static_range(LOG_CP2 - 1):
                    sq = tl.reduce(tl.reshape(sq, (RP2, 2, CP2 >> (lvl + 1))), 1, _SUM)
                total = tl.reduce(sq, 1, _SUM)
                count = tl.reduce(in_data.to(tl.float32), 1, _SUM)
            else:
                for lvl in tl.static_range(LOG_RP2):
                    sq = tl.reduce(tl.reshape(sq, (2, RP2 >> (lvl + 1), CP2)), 0, _SUM)
                for lvl in tl.static_range(LOG_CP2 - 1):
                    sq = tl.reduce(tl.reshape(sq, (1, 2, CP2 >> (lvl + 1))), 1, _SUM)
                # One block: its total and element count on every row (tl.reduce and tl.full, not
                # tl.sum and tl.zeros: see _SUM).
                total = tl.full([RP2], 0.0, tl.float32) + tl.reduce(tl.reduce(sq, 1, _SUM), 0, _SUM)
                count = tl.full([RP2], 0.0, tl.float32) + tl.reduce(tl.reduce(in_data.to(tl.float32), 1, _SUM), 0, _SUM)
            rms = tl.sqrt_rn(tl.div_rn(total, tl.where(count > 0, count, 1.0)))
            # torch computes `scale / rms` as rms.reciprocal() * scale.
            inv = tl.where(rms > 0, tl.div_rn(1.0, tl.where(rms > 0, rms, 1.0)) * tl.load(mf + _F_RSCALE), 0.0)
            move = rest * inv[:, None]
            # The parameter takes the torch path's dense part now, (p * decay) - lr * move (decay is
            # 1.0 without weight decay: p * 1.0 is p exactly), and the update kernel subtracts lr * u
            # at the window's positions with decay 1. In float32 that is the torch path's arithmetic
            # in its order; a bfloat16/float16 parameter is rounded here (with the torch path's
            # random bits, so positions outside the window get its value) and again there at the
            # window's positions (one extra rounding, with a stream of its own), where the torch
            # path rounds once.
            param_ptr = _typed_pointer(mi, _I_PARAM, PARAM_KIND)
            pos = o.to(tl.int64) + base
            pv = _load_param(param_ptr + pos, in_data, PARAM_KIND)
            newp = pv * tl.load(mf + _F_CDECAY) - tl.load(mf + _F_LR) * move
            stoch_par = tl.load(mi + _I_STOCH_PAR)
            par_key = _stream_key(pkey, step_mix, _MIX_PARAM)
            tl.store(param_ptr + pos, _round_param(newp, pos + offset, par_key, stoch_par, PARAM_KIND), mask=in_data)
            keep = tl.load(mf + _F_KEEP)
            # keep == 0 stores exact zeros (rest * 0 would give -0 for negative entries).
            rest = tl.where(keep != 0.0, rest * keep, 0.0)
        lo_raw, hi_raw = _seg_min_max(rest, in_data, seg, Q_MODE)
        # +0 for a zero min or max, whichever zero the reduction met first (ops.quant._plus_zero).
        lo16 = _bf16_round(tl.where(qrow_ok & (lo_raw != 0.0), lo_raw, 0.0), 0)
        hi16 = _bf16_round(tl.where(qrow_ok & (hi_raw != 0.0), hi_raw, 0.0), 1)
        lo = (lo16 << 16).to(tl.float32, bitcast=True)
        hi = (hi16 << 16).to(tl.float32, bitcast=True)
        scale = tl.div_rn(hi - lo, 15.0)
        positive = scale > 0
        safe = tl.where(positive, scale, 1.0)
        x = tl.div_rn(rest - lo[:, None], safe[:, None])
        if stoch_err != 0:
            x = x + (_hash_bits(o.to(tl.int64) + (base + offset), err_key) >> 8).to(tl.float32) * (1.0 / 16777216.0)
        else:
            x = x + 0.5
        code = tl.minimum(tl.maximum(tl.floor(x), 0.0), 15.0).to(tl.int32)
        code = tl.where(positive[:, None] & in_data, code, 0)
        # Rows of one quantization block all hold its bounds: equal values, written more than once.
        tl.store(bounds_ptr + qid_r * 2, lo16.to(tl.uint16).to(tl.int16, bitcast=True), mask=qrow_ok)
        tl.store(bounds_ptr + qid_r * 2 + 1, hi16.to(tl.uint16).to(tl.int16, bitcast=True), mask=qrow_ok)

        # 4. pack two codes per byte, the even position in the low nibble (ops.quant.pack_nibbles).
        if PAIRS:
            # Every row starts at an even position: pairs are adjacent columns.
            lo_c, hi_c = tl.split(tl.reshape(code, (RP2, CP2 // 2, 2)))
            packed = (lo_c | (hi_c << 4)).to(tl.uint8)
            j2 = tl.arange(0, CP2 // 2) * 2
            first = row_off[:, None] + j2[None, :]
            bmask = row_ok[:, None] & (j2[None, :] < C) & (first < n_here)
            tl.store(codes_ptr + (first >> 1), packed, mask=bmask)
        else:
            # Odd row length: a byte may straddle two rows. Even positions write their byte, then
            # odd positions add their nibble; both halves of a byte belong to this program (groups
            # hold an even number of elements), and a barrier orders the two writes.
            even = in_data & ((o & 1) == 0)
            # Every read of the old codes (step 1) precedes the first write of a byte: the even write
            # clears the high nibble, which another warp's row may not have read yet. (Reductions in
            # between happen to insert barriers on a GPU; this makes it a guarantee.)
            tl.debug_barrier()
            tl.store(codes_ptr + (o >> 1), code.to(tl.uint8), mask=even)
            tl.debug_barrier()
            odd = in_data & ((o & 1) == 1)
            low = tl.load(codes_ptr + (o >> 1), mask=odd, other=0)
            tl.store(codes_ptr + (o >> 1), low | (code << 4).to(tl.uint8), mask=odd)

    @triton.jit
    def _update_kernel(
        prog_tensor,
        prog_local,
        meta_i,
        meta_f,
        weights,
        KP2: tl.constexpr,
        MP2: tl.constexpr,
        DT: tl.constexpr,
        PARAM_KIND: tl.constexpr,
        VEC_SLOTS: tl.constexpr,
        CH: tl.constexpr,
    ):
        pid = tl.program_id(0)
        t = tl.load(prog_tensor + pid).to(tl.int64)
        blk = tl.load(prog_local + pid).to(tl.int64)
        mi = meta_i + t * _NI
        mf = meta_f + t * _NF
        n = tl.load(mi + _I_N)
        B = tl.load(mi + _I_B)
        k = tl.load(mi + _I_K)
        nb = tl.load(mi + _I_NB)
        write_slot = tl.load(mi + _I_SLOT)
        n_valid = tl.load(mi + _I_VALID).to(tl.int32)
        m = tl.load(mi + _I_M)
        update_stream = tl.load(mi + _I_UPDATE_STREAM).to(tl.uint32)
        par_key = _stream_key(tl.load(mi + _I_PKEY), tl.load(mi + _I_STEPMIX), update_stream)
        offset = tl.load(mi + _I_OFFSET)
        stoch = tl.load(mi + _I_STOCH_PAR)
        has_wd = tl.load(mi + _I_WD)
        param_ptr = _typed_pointer(mi, _I_PARAM, PARAM_KIND)
        widx_ptr = tl.load(mi + _I_WIDX).to(tl.pointer_type(tl.int16))
        wval_ptr = tl.load(mi + _I_WVAL).to(tl.pointer_type(tl.int16))
        lr = tl.load(mf + _F_LR)
        decay = tl.load(mf + _F_DECAY)
        c1 = tl.load(mf + _F_C1)
        c2 = tl.load(mf + _F_C2)
        eps = tl.load(mf + _F_EPS)
        w1_ptr = weights + t * 2 * MP2
        w2_ptr = w1_ptr + MP2

        e = tl.arange(0, KP2)
        emask = e < k
        slots = tl.arange(0, MP2)
        # Moments at the positions held in each valid slot j, summed over the slots in age order
        # (the order of the torch path's scatter_add on CPU and of the reference): equal sums, bit
        # for bit. A position occurs at most once per slot with a nonzero value (padding entries
        # are index 0, value 0), so each matched sum below is that one term, exactly.
        if VEC_SLOTS:
            # Small windows (MP2 * KP2 * KP2 <= 4096): all slots' entries at once.
            jvalid = slots < n_valid
            base_all = (((write_slot - slots + m) % m) * nb + blk) * k
            emask_all = jvalid[:, None] & emask[None, :]
            addr_all = base_all[:, None] + e[None, :]
            idx_all = tl.load(widx_ptr + addr_all, mask=emask_all, other=0).to(tl.int32)
            bits_all = tl.load(wval_ptr + addr_all, mask=emask_all, other=0).to(tl.uint16, bitcast=True)
            val_all = (bits_all.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
            mom1 = tl.full([MP2, KP2], 0, tl.float32)
            mom2 = tl.full([MP2, KP2], 0, tl.float32)
            for age in range(n_valid):
                base_a = (((write_slot - age + m) % m) * nb + blk) * k
                idx_a = tl.load(widx_ptr + base_a + e, mask=emask, other=-1).to(tl.int32)
                bits_a = tl.load(wval_ptr + base_a + e, mask=emask, other=0).to(tl.uint16, bitcast=True)
                val_a = (bits_a.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
                w1 = tl.load(w1_ptr + age)
                w2 = tl.load(w2_ptr + age)
                match = idx_all[:, :, None] == idx_a[None, None, :]
                mom1 += tl.reduce(tl.where(match, (val_a * w1)[None, None, :], 0.0), 2, _SUM)
                mom2 += tl.reduce(tl.where(match, (val_a * val_a * w2)[None, None, :], 0.0), 2, _SUM)
            den = tl.sqrt_rn(c2 * mom2) + eps
            # den == 0 only with eps == 0 where every entry is zero: no move, not 0/0.
            u = tl.where(den > 0, tl.div_rn(c1 * mom1, tl.where(den > 0, den, 1.0)), 0.0)
            pos_all = blk * B + idx_all.to(tl.int64)
            # A zero value moves nothing (u == 0 wherever all values are 0, and its position's
            # other entries carry the same u), so only nonzero entries write: padding never does.
            # Nor does an index outside the block (a corrupt state in memory; loads check indices):
            # it would write past the parameter, into whatever the allocator put there.
            ok_all = emask_all & (val_all != 0) & (idx_all >= 0) & (pos_all < tl.minimum(blk * B + B, n))
            p = _load_param(param_ptr + pos_all, ok_all, PARAM_KIND)
            new_all = _round_param(p * decay - lr * u, pos_all + offset, par_key, stoch, PARAM_KIND)
        else:
            # Large windows: one slot at a time, and its entries against another slot's CH at a time,
            # keep the compared tile at KP2 * CH (CH <= 64). Compared whole (KP2 * KP2), k = 410
            # (density 0.1, the Guard's default max_density, at block 4096) took 70 s to compile for
            # sm_90 and k = 1024 over 150 s (found by an audit). A position occurs at most once in a
            # slot, so each chunk's sum is that one term or zeros: the moments are the same, bit for bit.
            if PARAM_KIND == 0:
                new_all = tl.full([MP2, KP2], 0, tl.float32)
            elif PARAM_KIND == 1:
                new_all = tl.full([MP2, KP2], 0, tl.int16)
            else:
                new_all = tl.full([MP2, KP2], 0, tl.float16)
            pos_all = tl.full([MP2, KP2], 0, tl.int64)
            ok_all = tl.full([MP2, KP2], 0, tl.int1)
            for j in range(n_valid):
                base_j = (((write_slot - j + m) % m) * nb + blk) * k
                idx_j = tl.load(widx_ptr + base_j + e, mask=emask, other=0).to(tl.int32)
                bits_j = tl.load(wval_ptr + base_j + e, mask=emask, other=0).to(tl.uint16, bitcast=True)
                val_j = (bits_j.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
                mom1 = tl.full([KP2], 0, tl.float32)
                mom2 = tl.full([KP2], 0, tl.float32)
                for age in range(n_valid):
                    base_a = (((write_slot - age + m) % m) * nb + blk) * k
                    w1 = tl.load(w1_ptr + age)
                    w2 = tl.load(w2_ptr + age)
                    for c0 in range(0, KP2, CH):  # a loop, not unrolled: unrolled, k = 410 took 217 s
                        ea = c0 + tl.arange(0, CH)
                        amask = ea < k
                        idx_a = tl.load(widx_ptr + base_a + ea, mask=amask, other=-1).to(tl.int32)
                        bits_a = tl.load(wval_ptr + base_a + ea, mask=amask, other=0).to(tl.uint16, bitcast=True)
                        val_a = (bits_a.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
                        match = idx_j[:, None] == idx_a[None, :]
                        mom1 += tl.reduce(tl.where(match, (val_a * w1)[None, :], 0.0), 1, _SUM)
                        mom2 += tl.reduce(tl.where(match, (val_a * val_a * w2)[None, :], 0.0), 1, _SUM)
                den = tl.sqrt_rn(c2 * mom2) + eps
                u = tl.where(den > 0, tl.div_rn(c1 * mom1, tl.where(den > 0, den, 1.0)), 0.0)
                pos = blk * B + idx_j.to(tl.int64)
                ok = emask & (val_j != 0) & (idx_j >= 0) & (pos < tl.minimum(blk * B + B, n))
                p = _load_param(param_ptr + pos, ok, PARAM_KIND)
                new = _round_param(p * decay - lr * u, pos + offset, par_key, stoch, PARAM_KIND)
                here = (slots == j)[:, None]
                new_all = tl.where(here, new[None, :], new_all)
                pos_all = tl.where(here, pos[None, :], pos_all)
                ok_all = tl.where(here, ok[None, :], ok_all)

        # Every window load of the parameter above precedes any store into the block below: a
        # position held in several slots is loaded by several warps, and one warp's store landing
        # before another's load would apply lr * u twice (or, with the decay loop, the decay twice).
        # The interpreter runs each load and store over the whole block at once and cannot show it;
        # the sm_90 PTX had no bar.sync between them (found in review, 2026-11-30).
        tl.debug_barrier()
        if has_wd != 0:
            # Decoupled weight decay of every element of the block; window positions are then
            # overwritten with the values computed above from the undecayed parameter.
            start = blk * B
            end = tl.minimum(start + B, n)
            offs = tl.arange(0, DT)
            for s in range(0, B, DT):
                pos_d = start + s + offs
                dmask = pos_d < end
                p_d = _load_param(param_ptr + pos_d, dmask, PARAM_KIND)
                decayed = _round_param(p_d * decay, pos_d + offset, par_key, stoch, PARAM_KIND)
                tl.store(param_ptr + pos_d, decayed, mask=dmask)
            tl.debug_barrier()
        # Duplicate positions (one position in several slots) write equal values.
        tl.store(param_ptr + pos_all, new_all, mask=ok_all)


# Triton decides between compiling and interpreting when a kernel is decorated, i.e. when this
# module was imported: TRITON_INTERPRET set afterwards changes nothing, so ask the kernel.
_INTERPRETED = triton is not None and type(_compress_kernel).__name__ == "InterpretedFunction"


# ---------------------------------------------------------------------- host side


def update_chunk(kp2: int) -> int:
    """How many of another slot's entries the update kernel compares at a time (its ``CH``): the
    compared tile is ``KP2 * CH`` (see the kernel)."""
    return min(kp2, 64)


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@dataclass
class _Work:
    """One tensor's step, ready to launch: its steady row and this step's columns (see _launch)."""

    static: _Static
    scalars: StepScalars  # this step's numbers, one object for the tensors of a group and step
    step_mix: int
    grad_ptr: int
    param_ptr: int  # a contiguous copy's address; 0: the parameter's own, in the steady row
    floats: tuple[float, ...]  # the float row, one object for the tensors of a group and step
    weights: tuple[float, ...]  # the row of _age_weights, likewise shared
    keep: tuple[torch.Tensor, torch.Tensor]  # what the kernels read, alive until they are queued
    copy_back: tuple[torch.Tensor, torch.Tensor] | None = None


def _tile_plan(lay: Layout) -> tuple[int, int, int, int, int, int]:
    """(C, R, S, G, TK_MODE, Q_MODE): the compress tile of one tensor.

    A program's group is ``G = R * C`` elements in ``R`` rows of ``C``; every row lies in one Top-K
    block and one quantization block. The smaller kind of block is a row (mode 0); the larger is
    ``S`` rows, and the group holds one (mode 1) or two (mode 2: odd sizes, whose groups are doubled so
    that packed bytes never straddle two programs) of them.
    """
    n, B, q = lay.numel, lay.block, lay.quant_block
    if lay.num_blocks == 1:
        if q >= n:
            return n, 1, 1, n, 0, 0
        R = -(-n // q)
        return q, R, R, R * q, 1, 0
    if q % B == 0:
        G = math.lcm(q, 2)
        S = q // B
        return B, G // B, S, G, 0, 0 if S == 1 else G // q
    if B % q == 0:
        G = math.lcm(B, 2)
        return q, G // q, B // q, G, G // B, 0
    raise ValueError(
        f"impl='triton' needs one of block ({B}) and quant_block ({q}) to divide the other "
        "(MicroAdam's argument checks ensure it); use impl='torch' for this layout"
    )


def _flat(t: torch.Tensor, name: str) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError(f"impl='triton' needs a contiguous {name}, got strides {t.stride()}")
    return t


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
    chunk_size: int = 0,
    position_offset: int = 0,
    release: float = 0.0,
    release_scale: float = 1.0,
) -> _Work | None:
    # chunk_size bounds the torch path's temporaries; the kernels keep theirs in registers.
    del chunk_size
    if layout.numel == 0:
        return None
    # The host time per tensor is what a step of a model of hundreds of tensors costs on a GPU that
    # waits for it (the range check has synchronized), so the part of a tensor's table row that
    # does not change between steps is built once (_static) and looked up by every input it is
    # computed from (the fingerprint), then this step's columns are filled in.
    p_contig = param.is_contiguous()
    fingerprint = (
        param.data_ptr() if p_contig else -1,
        param.dtype,
        param.device,
        param.numel(),
        grad.dtype,
        grad.device,
        grad.numel(),
        # _static's check_state holds for a row served from the cache.
        state_key(window_indices, window_values, error_codes, error_bounds),
        window_indices.is_contiguous()
        and window_values.is_contiguous()
        and error_codes.is_contiguous()
        and error_bounds.is_contiguous(),
        layout,
        error_rounding,
        bool(stochastic_param_rounding),
        seed,
        param_index,
        position_offset,
        bool(release),
        weight_decay != 0,
    )
    st = _STATICS.get(fingerprint)
    if st is None:
        st = _static(
            param,
            grad,
            window_indices=window_indices,
            window_values=window_values,
            error_codes=error_codes,
            error_bounds=error_bounds,
            layout=layout,
            weight_decay=weight_decay,
            error_rounding=error_rounding,
            stochastic_param_rounding=stochastic_param_rounding,
            seed=seed,
            param_index=param_index,
            position_offset=position_offset,
            release=release,
        )
        if len(_STATICS) >= _MAX_STATICS:
            # The launches' cached tables hold the rows, and their program maps device memory: they
            # go too (rebuilt at the next launch).
            _STATICS.clear()
            _BATCHES.clear()
        _STATICS[fingerprint] = st

    # keys=False: the shared part only (cached per step); the random streams' keys are below.
    sc = step_scalars(
        step=step,
        window=st.window,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        param_index=param_index,
        release=release,
        keys=False,
    )
    g_flat = grad if grad.is_contiguous() else grad.reshape(-1).contiguous()
    work_param = param if p_contig else param.contiguous()
    return _Work(
        static=st,
        scalars=sc,
        step_mix=_mix32_cached(step),
        grad_ptr=g_flat.data_ptr(),
        param_ptr=0 if p_contig else work_param.data_ptr(),
        # The cache compares -0.0 equal to 0.0: the signs are part of the key, so that a user's -0.0
        # stays -0.0 (the torch path's p - (-0.0) * u differs from p - 0.0 * u in a zero's sign).
        floats=_float_row(
            lr,
            bool(release),
            sc.c1,
            sc.c2,
            eps,
            sc.decay,
            sc.keep,
            release_scale,
            (math.copysign(1.0, lr), math.copysign(1.0, eps), math.copysign(1.0, release_scale)),
        ),
        weights=_age_weights(sc.w1, sc.w2, st.mp2),
        keep=(work_param, g_flat),
        copy_back=None if p_contig else (param, work_param),
    )


@functools.lru_cache(maxsize=256)
def _float_row(
    lr: float,
    release: bool,
    c1: float,
    c2: float,
    eps: float,
    decay: float,
    keep: float,
    release_scale: float,
    signs: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> tuple[float, ...]:
    # The float columns (_F_*), float32 in the table: torch rounds a Python scalar to the tensor's
    # float32 before multiplying. Cached so that the tensors of a group share one object per step.
    return (lr, 1.0 if release else decay, c1, c2, eps, decay, keep, release_scale)


@functools.lru_cache(maxsize=256)
def _age_weights(w1: tuple[float, ...], w2: tuple[float, ...], mp2: int) -> tuple[float, ...]:
    # beta1**age then beta2**age for ages 0..valid-1 in order, each padded to the kernel's power of
    # two; the kernel finds each age's slot from the write slot. Shared by every tensor of a step.
    return (*w1, *[0.0] * (mp2 - len(w1)), *w2, *[0.0] * (mp2 - len(w2)))


# Host-side copies of the per-step columns: indexing a list with a tl.constexpr goes through its
# __index__, a Python call per access.
_H_SLOT, _H_VALID, _H_STEPMIX, _H_GRAD, _H_PARAM = (int(c) for c in (_I_SLOT, _I_VALID, _I_STEPMIX, _I_GRAD, _I_PARAM))
_H_STEP_COLUMNS = [_H_SLOT, _H_VALID, _H_STEPMIX]
# The float columns in the order _prepare lists them.
assert [int(c) for c in (_F_LR, _F_DECAY, _F_C1, _F_C2, _F_EPS, _F_CDECAY, _F_KEEP, _F_RSCALE)] == list(range(8))


@dataclass
class _Static:
    """The part of one tensor's step that is the same every step (see _prepare)."""

    key: tuple  # the launch it joins: tile shape and dtypes
    ints: tuple[int, ...]  # its int table row, this step's columns still to fill (in a copy)
    groups: int
    blocks: int
    window: int
    mp2: int
    stoch_err: bool
    stoch_param: bool


# fingerprint -> _Static. Every input of _static is in the fingerprint (pointers included: a new
# tensor at a reused address gets the same row, which is then right for it too), so an entry is
# never stale, only unused; the dict is emptied when full rather than tracking which.
_STATICS: dict[tuple, _Static] = {}
_MAX_STATICS = 1 << 16  # tensors; a mixture-of-experts model may have tens of thousands


def _static(
    param: torch.Tensor,
    grad: torch.Tensor,
    *,
    window_indices: torch.Tensor,
    window_values: torch.Tensor,
    error_codes: torch.Tensor,
    error_bounds: torch.Tensor,
    layout: Layout,
    weight_decay: float,
    error_rounding: str,
    stochastic_param_rounding: bool,
    seed: int,
    param_index: int,
    position_offset: int,
    release: float,
) -> _Static:
    """Check one tensor's arguments and build the steady part of its table row.

    The checks are those whose inputs are in _prepare's fingerprint. The state tensors' devices are
    not (only their addresses): CUDA's unified addressing gives every device and the host disjoint
    addresses, so an address that passed the device check once stays on that device.
    """
    n = layout.numel
    if param.dtype not in _PARAM_KINDS:
        raise TypeError(
            f"impl='triton' supports float32, bfloat16 and float16 parameters, got {param.dtype}; "
            "use impl='torch' (e.g. for float64)"
        )
    if grad.dtype not in _GRAD_KINDS:
        raise TypeError(f"impl='triton' supports float32/bfloat16/float16/float64 gradients, got {grad.dtype}")
    if error_rounding not in ("nearest", "stochastic"):
        raise ValueError(f"Invalid error_rounding: {error_rounding!r}; use 'nearest' or 'stochastic'")
    if param.numel() != n or grad.numel() != n:
        raise ValueError(f"layout.numel={n} but param has {param.numel()} and grad {grad.numel()} elements")
    tensors = (param, grad, window_indices, window_values, error_codes, error_bounds)
    device = param.device
    if any(x.device != device for x in tensors):
        raise ValueError(f"impl='triton': all tensors must be on one device, got {[str(x.device) for x in tensors]}")
    if _INTERPRETED and device.type != "cpu":
        raise ValueError("impl='triton' under TRITON_INTERPRET=1 runs on CPU tensors; move them to the CPU")
    if not _INTERPRETED and device.type != "cuda":
        raise ValueError(
            f"impl='triton' runs on CUDA tensors, got {device}; use impl='torch' (or TRITON_INTERPRET=1 for tests)"
        )

    C, R, S, G, tk_mode, q_mode = _tile_plan(layout)
    # Checked for every tensor of a call before any is launched: a kernel that failed to compile after
    # the compress kernel had run would leave a half-applied step.
    problem = triton_layout_error(
        layout.block, layout.quant_block, release, layout.k, layout.window, layout.num_blocks > 1
    )
    if problem is not None:
        raise ValueError(problem)
    # The kernels index raw pointers: a state of another layout would be read and written out of bounds.
    check_state(
        layout,
        window_indices=window_indices,
        window_values=window_values,
        error_codes=error_codes,
        error_bounds=error_bounds,
    )
    pairs = C % 2 == 0 or R == 1
    m, k = layout.window, layout.k
    state_ptrs = [
        _flat(window_indices, "window_indices").data_ptr(),
        _flat(window_values, "window_values").data_ptr(),
        _flat(error_codes, "error_codes").data_ptr(),
        _flat(error_bounds, "error_bounds").data_ptr(),
    ]
    stoch_err = error_rounding == "stochastic"
    stoch_param = bool(stochastic_param_rounding) and param.dtype == torch.bfloat16
    mp2 = _next_pow2(m)
    ints = [0] * int(_NI)
    ints[_I_N], ints[_I_B], ints[_I_K], ints[_I_Q], ints[_I_NB] = (
        n,
        layout.block,
        k,
        layout.quant_block,
        layout.num_blocks,
    )
    ints[_I_C], ints[_I_R], ints[_I_S], ints[_I_G] = C, R, S, G
    ints[_I_M] = m
    ints[_I_OFFSET] = position_offset
    ints[_I_STOCH_ERR] = int(stoch_err)
    ints[_I_STOCH_PAR] = int(stoch_param)
    if stoch_err or stoch_param:
        ints[_I_PKEY] = _param_key(seed, param_index)
    # The update kernel's rounding: the torch path's stream, or with release (where the compress
    # kernel has used that stream for the parameter's first rounding) a stream of its own.
    ints[_I_UPDATE_STREAM] = _mix32_int(STREAM_MOVE if release else STREAM_PARAM)
    # With release the compress kernel applies the weight decay (with the dense move) and the
    # update kernel none.
    ints[_I_WD] = int(weight_decay != 0 and not release)
    # A non-contiguous parameter is stepped in a contiguous copy, whose address _prepare fills in.
    ints[_I_PARAM] = param.data_ptr() if param.is_contiguous() else 0
    ints[_I_WIDX], ints[_I_WVAL], ints[_I_CODES], ints[_I_BOUNDS] = state_ptrs
    key = (
        device,
        _PARAM_KINDS[param.dtype],
        _GRAD_KINDS[grad.dtype],
        _next_pow2(R),
        max(2, _next_pow2(C)),
        tk_mode,
        q_mode,
        pairs,
        max(2, _next_pow2(k)),
        mp2,
        min(1024, _next_pow2(layout.block)),
        bool(release),
    )
    return _Static(
        key=key,
        ints=tuple(ints),
        groups=-(-n // G),
        blocks=layout.num_blocks,
        window=m,
        mp2=mp2,
        stoch_err=stoch_err,
        stoch_param=stoch_param,
    )


def _radix_bits(tile: int) -> int:
    """Bits decided per round of the radix select: 1 to 4, comparing at most 16384 keys to candidates.

    More bits mean fewer rounds (each a reduction across the program) but 2**bits comparisons per key;
    a 4096-element tile (the default block) gets 2 bits, 16 rounds.
    """
    return max(1, min(4, (16384 // tile).bit_length() - 1))


def _num_warps(elements: int) -> int:
    # About 16 elements of the largest tile per thread, at most 8 warps: compiled for sm_90 without
    # a GPU (cuobjdump -res-usage), the 4096-element compress tile of the default block takes 253
    # registers and no spill at 8 warps, but spills 56 bytes at 16, where a thread may hold only
    # 128. That is Triton 3.9; the lent H200's image has Triton 3.6, whose code for the same bf16
    # tile spills 1064 bytes a thread (1512 for the paper variant), measured the same way: its step
    # times are that version's. The interpreter ignores it.
    return max(1, min(8, _next_pow2(elements) // 512))


def _program_maps(
    device: torch.device, groups: tuple[int, ...], blocks: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """program -> (tensor, group) for the compress kernel and program -> (tensor, block) for the
    update kernel, as int32 tensors on ``device``. They depend on the tensors' sizes only, so they
    are built and copied to the device once per launch's list of tensors (kept in _BATCHES), not
    every step."""
    counts_c = torch.tensor(groups)
    counts_u = torch.tensor(blocks)
    ids = torch.arange(len(groups))
    tensor_c = ids.repeat_interleave(counts_c)
    local_c = torch.arange(len(tensor_c)) - (counts_c.cumsum(0) - counts_c).repeat_interleave(counts_c)
    tensor_u = ids.repeat_interleave(counts_u)
    local_u = torch.arange(len(tensor_u)) - (counts_u.cumsum(0) - counts_u).repeat_interleave(counts_u)
    return tuple(x.to(device=device, dtype=torch.int32) for x in (tensor_c, local_c, tensor_u, local_u))  # type: ignore[return-value]


def _table(rows: Sequence[Sequence[int | float]], dtype: torch.dtype) -> torch.Tensor:
    """A CPU table of equal-length rows: the same row for all when they are one object (a group's
    tensors in a step), else one flat array (about half the time of torch.tensor on nested lists)."""
    first = rows[0]
    if all(r is first for r in rows):
        return torch.tensor(first, dtype=dtype).expand(len(rows), -1).contiguous()
    flat = array.array("q" if dtype == torch.int64 else "f", itertools.chain.from_iterable(rows))
    return torch.frombuffer(flat, dtype=dtype).view(len(rows), -1)


def _upload(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small per-step CPU table on ``device``. On CUDA it goes through pinned memory, asynchronously:
    a copy from pageable memory first waits for the stream to drain, which would stop the host
    from queueing the next launch while the GPU works (torch's caching host allocator keeps the
    pinned block until the copy has run)."""
    if device.type != "cuda":
        return table.to(device)
    return table.pin_memory().to(device, non_blocking=True)


@dataclass
class _Batch:
    """The steady tables of a launch's tensors, built once for that list of _Static rows."""

    statics: tuple[_Static, ...]  # held, so that their ids (the key of _BATCHES) stay theirs
    ints: torch.Tensor  # the steady int rows; _launch fills in this step's columns in a copy
    maps: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # _program_maps


# (id of each _Static of a launch, device) -> its _Batch; emptied when full (a step has one launch
# per tile class and dtypes: a handful). The only cache of the program maps, which are device memory.
_BATCHES: dict[tuple, _Batch] = {}
_MAX_BATCHES = 64


def _int_table(batch: list[_Work], device: torch.device) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The int table of a launch (on ``device``) and its program maps.

    Per step only a few columns change, and for a group's tensors they hold the same values: the
    steady rows are cached per list of tensors and copied, then those columns are filled with one
    write each (a row per tensor only for the gradients' addresses, and where tensors differ).
    """
    statics = tuple(w.static for w in batch)
    key = (tuple(map(id, statics)), device)
    entry = _BATCHES.get(key)
    if entry is None:
        if len(_BATCHES) >= _MAX_BATCHES:
            _BATCHES.clear()
        maps = _program_maps(device, tuple(st.groups for st in statics), tuple(st.blocks for st in statics))
        entry = _BATCHES[key] = _Batch(statics, _table([st.ints for st in statics], torch.int64), maps)
    table = entry.ints.clone()
    first = batch[0]
    if all(w.scalars is first.scalars and w.step_mix == first.step_mix for w in batch):
        table[:, _H_STEP_COLUMNS] = torch.tensor([first.scalars.write_slot, len(first.scalars.slots), first.step_mix])
    else:
        rows = [(w.scalars.write_slot, len(w.scalars.slots), w.step_mix) for w in batch]
        table[:, _H_STEP_COLUMNS] = torch.tensor(rows)
    table[:, _H_GRAD] = torch.tensor([w.grad_ptr for w in batch])
    for i, w in enumerate(batch):
        if w.param_ptr:
            table[i, _H_PARAM] = w.param_ptr
    return _upload(table, device), entry.maps


def _launch(works: list[_Work]) -> None:
    by_key: dict[tuple, list[_Work]] = {}
    for w in works:
        by_key.setdefault(w.static.key, []).append(w)
    for key, batch in by_key.items():
        device = key[0]
        if device.type == "cuda":
            # Triton launches on the current device and its current stream: tensors on another GPU
            # (a model split over several, e.g. device_map="auto") need theirs made current.
            with torch.cuda.device(device):
                _launch_batch(key, batch)
        else:
            _launch_batch(key, batch)
    for w in works:
        if w.copy_back is not None:
            param, work_param = w.copy_back
            param.copy_(work_param.view(param.shape))
        else:
            # Raw-pointer writes bypass autograd's version counter; bump it as an in-place op would, so
            # a graph that saved the parameter refuses to backpropagate through the stepped values (as
            # the torch and C++ paths do; found by an audit).
            torch.autograd.graph.increment_version(w.keep[0])


def _launch_batch(key: tuple, batch: list[_Work]) -> None:
    """Both kernels for tensors of one launch key (one device, tile shape and dtypes)."""
    device, param_kind, grad_kind, rp2, cp2, tk_mode, q_mode, pairs, kp2, mp2, dt, release = key
    meta_i, (tensor_c, local_c, tensor_u, local_u) = _int_table(batch, device)
    meta_f = _upload(_table([w.floats for w in batch], torch.float32), device)
    weights = _upload(_table([w.weights for w in batch], torch.float32), device)
    vec_slots = mp2 * kp2 * kp2 <= 4096
    # FMA contraction off: torch rounds a product before adding (see the module docstring).
    _compress_kernel[(len(tensor_c),)](
        tensor_c,
        local_c,
        meta_i,
        meta_f,
        RP2=rp2,
        CP2=cp2,
        TK_MODE=tk_mode,
        Q_MODE=q_mode,
        PAIRS=pairs,
        GRAD_KIND=grad_kind,
        RADIX_BITS=_radix_bits(rp2 * cp2),
        RELEASE=release,
        PARAM_KIND=param_kind,
        LOG_CP2=cp2.bit_length() - 1,
        LOG_RP2=rp2.bit_length() - 1,
        num_warps=_num_warps(rp2 * cp2),
        enable_fp_fusion=False,
    )
    _update_kernel[(len(tensor_u),)](
        tensor_u,
        local_u,
        meta_i,
        meta_f,
        weights,
        KP2=kp2,
        MP2=mp2,
        DT=dt,
        PARAM_KIND=param_kind,
        VEC_SLOTS=vec_slots,
        CH=update_chunk(kp2),
        num_warps=_num_warps(max(dt, mp2 * kp2 * kp2 if vec_slots else kp2 * update_chunk(kp2))),
        enable_fp_fusion=False,
    )


def _check_available() -> None:
    ok, why = available()
    if not ok:
        raise RuntimeError(why)


def microadam_step_triton(
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
    chunk_size: int = 0,
    position_offset: int = 0,
    release: float = 0.0,
    release_scale: float = 1.0,
) -> None:
    """One MicroAdam step on ``param`` in place: :func:`microadam.functional.microadam_step` with Triton.

    Same arguments and effect as the torch path (``chunk_size`` is accepted and unused: the kernels
    hold no full-size temporaries). Parameters may be float32, bfloat16 or float16 on a CUDA device
    (or CPU tensors under ``TRITON_INTERPRET=1``); gradients float32, bfloat16, float16 or float64.
    """
    _check_available()
    work = _prepare(
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
    if work is not None:
        _launch([work])


def microadam_step_triton_multi(steps: Sequence[Mapping[str, Any]]) -> None:
    """Many :func:`microadam_step_triton` calls in as few launches as possible.

    Each item holds the arguments of one call by name (``param``, ``grad`` and the keyword
    arguments). Tensors whose tiles have the same shape and dtypes share a launch of each kernel,
    so a model's many small tensors (biases, norms) do not cost two launches each. For example,
    with ``state[i]`` the four state tensors of ``params[i]`` by name::

        hyper = dict(step=t, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                     error_rounding="nearest", stochastic_param_rounding=True, seed=0)
        microadam_step_triton_multi([
            dict(param=p, grad=p.grad, layout=layouts[i], param_index=i, **state[i], **hyper)
            for i, p in enumerate(params)
        ])
    """
    run_prepared(prepare_many(steps))


def prepare_many(steps: Sequence[Mapping[str, Any]]) -> list[_Work | None]:
    """The first phase of :func:`microadam_step_triton_multi`: every item checked and its table rows
    built; nothing is written or launched (a non-contiguous tensor's contiguous copy is made here)."""
    _check_available()
    return prepare_each(_prepare, steps)


def run_prepared(works: list[_Work | None]) -> None:
    """The second phase of :func:`microadam_step_triton_multi`: launch what :func:`prepare_many` built."""
    _launch([w for w in works if w is not None])
