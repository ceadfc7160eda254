"""The optimizer state of sharded (FSDP2, DTensor) parameters in a layout that reshards.

During training a rank keeps the state of its own shard, cut into blocks from the shard's first
element (``microadam.optimizer``). A checkpoint must outlive the sharding, so ``state_dict`` writes
every sharded parameter's state in its *global* layout: the layout one process would have for the
whole tensor (``layout_for(full numel)``), as DTensors over that layout. Window entries are then
indexed by global block, error codes by global element, bounds by global quantization block, and
``torch.distributed.checkpoint`` can save them from one world size and load them into another.

Two cases, decided from the tensor's global shape and the mesh alone, so every rank agrees:

* **Aligned**: every rank's shard starts and ends on a Top-K block and a quantization block
  boundary of the global layout, and DTensor's even chunking of the global state tensors gives each
  rank exactly its own blocks. The rank's state *is* its part of the global state: it is wrapped as
  ``Shard`` DTensors with no communication and no copy but of the indices (widened, below), and
  loads back bit for bit, at any world size where the target is aligned too. (Typical weights: rows
  split evenly into whole blocks.)
* **Not aligned** (e.g. a 1-D bias split mid-block): the shards' blocks are not the global blocks.
  ``state_dict`` gathers the shards' entries over the mesh (a collective: every rank must call it,
  as with any DCP save) and re-cuts them into the global layout, as ``Replicate`` DTensors. On load,
  a target that is not aligned takes the global state and re-cuts it into its own blocks. Re-cutting
  keeps each entry at its element; where a block receives more entries of one step than it holds
  (``k``), the smallest are dropped, and the error feedback is re-quantized on the new blocks
  (within one quantization step). Both are counted in :data:`LAST_RESHARD`. Same-world resumes are
  exact only for aligned parameters; the others move within these bounds.

``window_indices`` are int16 in a rank's state but int32 in the global layout: gloo and NCCL have no
int16, so a gather of an int16 DTensor (``get_optimizer_state_dict(full_state_dict=True)``,
``full_tensor()``) fails with "Invalid scalar type". ``to_local`` narrows them back (refusing values that
do not fit); DCP casts between the two on load, so checkpoints written with int16 still load.

Each global-layout entry carries ``row_ids`` (the global row numbers of the rows this rank holds, a
``Shard(0)`` DTensor like the parameter): after a load they must be this rank's rows, so a per-rank
file loaded on the wrong rank is refused instead of silently taking another shard's state.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from typing import Any

import torch

from microadam.functional import _pad_rows, zero_state
from microadam.layout import Layout
from microadam.ops.quant import dequantize_blocks, pack_nibbles, quantize_blocks, unpack_nibbles
from microadam.ops.topk import block_topk

__all__ = ["ShardSpec", "shard_spec", "is_aligned", "to_global", "to_local", "flattening_requested", "LAST_RESHARD"]

# What the last re-cut dropped or re-quantized (entries, elements), for logs and tests.
LAST_RESHARD: dict[str, int] = {"dropped_entries": 0, "requantized_elements": 0}

MICRO_KEYS = ("window_indices", "window_values", "error_codes", "error_bounds")
DENSE_KEYS = ("exp_avg", "exp_avg_sq")
# The dtype of window_indices in the global layout: one every process-group backend can gather.
WIRE_INDEX_DTYPE = torch.int32


def _chunk(n: int, world: int, r: int) -> tuple[int, int]:
    """Rows [start, end) of chunk ``r`` when DTensor's ``Shard`` splits ``n`` rows over ``world``."""
    size = -(-n // world) if world else n
    return min(r * size, n), min((r + 1) * size, n)


@dataclass(frozen=True)
class ShardSpec:
    """How a DTensor parameter is split: ``Shard(0)`` over one mesh dimension, replicated over the rest."""

    mesh: Any
    mesh_dim: int
    world: int
    rank: int
    rows: int
    row_numel: int

    def element_range(self, r: int) -> tuple[int, int]:
        a, b = _chunk(self.rows, self.world, r)
        return a * self.row_numel, b * self.row_numel


def shard_spec(p: torch.Tensor) -> ShardSpec | None:
    """The sharding of ``p``, or ``None`` for a plain tensor. Raises for layouts MicroAdam cannot step."""
    if type(p).__name__ != "DTensor":
        return None
    if torch.torch_version.TorchVersion(torch.__version__) < (2, 6):
        # The public torch.distributed.tensor and FSDP2 on CPU came with 2.6: older ones fail deep in.
        raise RuntimeError(
            f"MicroAdam steps DTensor (FSDP2) parameters with torch >= 2.6; this is torch {torch.__version__}. "
            "Upgrade torch, or train without sharding the parameters (DDP works on torch >= 2.4)"
        )
    from torch.distributed.tensor import Replicate, Shard

    dims = [i for i, pl in enumerate(p.placements) if isinstance(pl, Shard)]
    others_ok = all(isinstance(pl, (Shard, Replicate)) for pl in p.placements)
    if len(dims) > 1 or not others_ok or (dims and p.placements[dims[0]].dim != 0):
        raise NotImplementedError(
            f"a DTensor parameter with placements {p.placements}: MicroAdam supports Shard(0) on one mesh "
            "dimension (FSDP2's fully_shard, optionally with replication as in HSDP), not tensor parallelism"
        )
    if not dims:  # replicated everywhere: every rank holds the whole tensor (mesh_dim -1)
        rows = p.shape[0] if p.dim() else 1
        return ShardSpec(p.device_mesh, -1, 1, 0, rows, p.numel() // rows if rows else 0)
    d = dims[0]
    rows = p.shape[0]
    row_numel = p.numel() // rows if rows else 0
    mesh = p.device_mesh
    return ShardSpec(mesh, d, mesh.size(d), mesh.get_local_rank(d), rows, row_numel)


def is_aligned(spec: ShardSpec, glob: Layout, local_layout: Any) -> bool:
    """Whether every rank's shard is exactly its DTensor chunk of each global state tensor.

    ``local_layout(numel)`` gives a shard's own layout. Checked for all ranks, so every rank agrees.
    """
    n = glob.numel
    for r in range(spec.world):
        s, e = spec.element_range(r)
        lay = local_layout(e - s)
        if e == s:
            need = [(glob.num_blocks, (0, 0)), (glob.num_quant_blocks, (0, 0)), ((n + 1) // 2, (0, 0))]
            if any(_chunk(total, spec.world, r)[1] > _chunk(total, spec.world, r)[0] for total, _ in need):
                return False
            continue
        if lay.block != glob.block or s % glob.block or s % glob.quant_block or s % 2:
            return False
        wanted = [
            (glob.num_blocks, (s // glob.block, s // glob.block + lay.num_blocks)),
            (glob.num_quant_blocks, (s // glob.quant_block, s // glob.quant_block + lay.num_quant_blocks)),
            ((n + 1) // 2, (s // 2, s // 2 + (e - s + 1) // 2)),
        ]
        if any(_chunk(total, spec.world, r) != span for total, span in wanted):
            return False
    return True


def _dtensor(local: torch.Tensor, spec: ShardSpec, shard_dim: int | None, shape: tuple[int, ...]) -> torch.Tensor:
    """Wrap ``local`` as a DTensor of global ``shape``: sharded on ``shard_dim`` over the shard mesh
    dimension (``None``: replicated), replicated over the mesh's other dimensions."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    placements = [Replicate()] * spec.mesh.ndim
    if shard_dim is not None and spec.mesh_dim >= 0:
        placements[spec.mesh_dim] = Shard(shard_dim)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, spec.mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride)


# ---------------------------------------------------------------- re-cutting through dense values


def _window_dense(idx: torch.Tensor, val: torch.Tensor, lay: Layout, slot: int) -> torch.Tensor:
    """Slot ``slot`` of a window as dense float32 values over the tensor's ``lay.numel`` elements.

    Entries are added, not written: a block padded with (index 0, value 0) beside a real entry at
    index 0 keeps the real value. Within one slot every element is selected at most once.
    """
    base = (torch.arange(lay.num_blocks, device=idx.device) * lay.block)[:, None]
    pos = (idx[slot].long() + base).view(-1)
    dense = torch.zeros(lay.num_blocks * lay.block, dtype=torch.float32, device=idx.device)
    dense.index_add_(0, pos, val[slot].float().view(-1))
    return dense[: lay.numel]


def _select(dense: torch.Tensor, lay: Layout) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The window slot a step would write for ``dense`` (Top-k per block, the project's tie rule).

    Returns (int16 indices, bf16 values, nonzero entries that did not fit).
    """
    n, B = lay.numel, lay.block
    blocks = _pad_rows(dense, lay.num_blocks, B, 0.0)
    mag = blocks.abs()
    if lay.num_blocks * B != n:
        mag.view(-1)[n:] = -1.0
    idx = block_topk(mag, lay.k)
    vals = blocks.gather(1, idx)
    if lay.num_blocks * B != n:
        padded = (idx + (torch.arange(lay.num_blocks, device=dense.device) * B)[:, None]) >= n
        idx, vals = idx.masked_fill(padded, 0), vals.masked_fill(padded, 0.0)
    dropped = int((dense != 0).sum()) - int((vals != 0).sum())
    return idx.to(torch.int16), vals.to(torch.bfloat16), dropped


def _error_dense(codes: torch.Tensor, bounds: torch.Tensor, lay: Layout) -> torch.Tensor:
    q, n = lay.quant_block, lay.numel
    c = unpack_nibbles(codes, n)
    c = torch.cat([c, c.new_zeros(lay.num_quant_blocks * q - n)]).view(-1, q)
    return dequantize_blocks(c, bounds[:, 0], bounds[:, 1], torch.float32).view(-1)[:n]


def _error_state(x: torch.Tensor, lay: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    codes, lo, hi = quantize_blocks(_pad_rows(x, lay.num_quant_blocks, lay.quant_block, None), None)
    return pack_nibbles(codes.view(-1)[: lay.numel]), torch.stack([lo, hi], dim=1)


def _recut(pieces: list[tuple[int, dict[str, torch.Tensor], Layout]], start: int, lay: Layout) -> dict:
    """The state of elements [start, start + lay.numel) under ``lay``, from pieces given as
    (global offset, state, layout) that together cover that range (and maybe more)."""
    if lay.numel == 0:
        return _empty_state(lay, pieces[0][1]["window_values"].device)
    end = start + lay.numel
    device = pieces[0][1]["window_values"].device
    idx = torch.zeros((lay.window, lay.num_blocks, lay.k), dtype=torch.int16, device=device)
    val = torch.zeros((lay.window, lay.num_blocks, lay.k), dtype=torch.bfloat16, device=device)
    dropped = 0
    for slot in range(lay.window):
        dense = torch.zeros(lay.numel, dtype=torch.float32, device=device)
        for off, st, play in pieces:
            a, b = max(off, start), min(off + play.numel, end)
            if a < b and play.numel:
                dense[a - start : b - start] += _window_dense(st["window_indices"], st["window_values"], play, slot)[
                    a - off : b - off
                ]
        idx[slot], val[slot], lost = _select(dense, lay)
        dropped += lost
    err = torch.zeros(lay.numel, dtype=torch.float32, device=device)
    for off, st, play in pieces:
        a, b = max(off, start), min(off + play.numel, end)
        if a < b and play.numel:
            err[a - start : b - start] = _error_dense(st["error_codes"], st["error_bounds"], play)[a - off : b - off]
    codes, bounds = _error_state(err, lay)
    LAST_RESHARD["dropped_entries"] += dropped
    LAST_RESHARD["requantized_elements"] += lay.numel
    return {"window_indices": idx, "window_values": val, "error_codes": codes, "error_bounds": bounds}


def _empty_state(lay: Layout, device: torch.device) -> dict[str, torch.Tensor]:
    return zero_state(lay, device)


# ---------------------------------------------------------------- save and load


def _row_ids(spec: ShardSpec, device: torch.device) -> torch.Tensor:
    a, b = _chunk(spec.rows, spec.world, spec.rank)
    return _dtensor(torch.arange(a, b, dtype=torch.int32, device=device), spec, 0, (spec.rows,))


def to_global(
    st: dict[str, Any], p: torch.Tensor, glob: Layout, local_layout: Any, blob: bool = True
) -> dict[str, Any]:
    """A sharded parameter's state entry in the global layout (see the module docstring).

    ``st`` is the rank's live state of its shard, ``glob`` the global layout, ``local_layout(numel)``
    the layout of a shard of ``numel`` elements. ``blob=False`` leaves out the "shards" entry (the
    exact states of shards that had to be re-cut): for a state dict that torch will flatten
    (:func:`flattening_requested`).
    """
    spec = shard_spec(p)
    assert spec is not None
    device = p.to_local().device
    out: dict[str, Any] = {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)}
    out["numel"] = glob.numel
    out["row_ids"] = _row_ids(spec, device)
    # Every sharded entry has "shards" (bytes or None, opaque to DCP, the same on every rank), so a template
    # built at any world size asks for it: None unless the state had to be re-cut (below). Not b"":
    # pickle protocol 2 (torch.save's) writes an empty bytes object as a call of the bytes class,
    # which torch.load(weights_only=True), torch's default, refuses ("Unsupported global: GLOBAL bytes").
    if blob:
        out["shards"] = None
    if "exp_avg" in st:  # fell back to dense AdamW: moments shaped (and sharded) like the parameter
        for key in DENSE_KEYS:
            out[key] = _dtensor(st[key], spec, 0, tuple(p.shape))
        return out
    shapes = {
        "window_indices": (glob.window, glob.num_blocks, glob.k),
        "window_values": (glob.window, glob.num_blocks, glob.k),
        "error_codes": ((glob.numel + 1) // 2,),
        "error_bounds": (glob.num_quant_blocks, 2),
    }
    dims = {"window_indices": 1, "window_values": 1, "error_codes": 0, "error_bounds": 0}
    if is_aligned(spec, glob, local_layout):
        for key in MICRO_KEYS:
            out[key] = _dtensor(_wire(key, st[key]), spec, dims[key], shapes[key])
        return out
    # Not aligned: gather every shard's state (on the CPU) and re-cut it into the global blocks.
    import torch.distributed as dist

    s, e = spec.element_range(spec.rank)
    mine = (s, {k: st[k].cpu() for k in MICRO_KEYS}, local_layout(e - s))
    everyone: list[Any] = [None] * spec.world
    dist.all_gather_object(everyone, mine, group=spec.mesh.get_group(spec.mesh_dim))
    full = _recut(everyone, 0, glob)
    for key in MICRO_KEYS:
        out[key] = _dtensor(_wire(key, full[key].to(device)), spec, None, shapes[key])
    # Re-cutting is not exact, so the shards' own states ride along: a load with the same sharding
    # takes its state from here, bit for bit; another sharding re-cuts the global layout above.
    buf = io.BytesIO()
    torch.save(
        {"ranges": [(off, off + lay.numel) for off, _, lay in everyone], "states": [st for _, st, _ in everyone]}, buf
    )
    if blob:
        out["shards"] = buf.getvalue()
    return out


# torch's get_optimizer_state_dict flattens the optimizer's state_dict() into one key per value when
# asked (StateDictOptions(flatten_optimizer_state_dict=True), torchtitan's and OLMo-core's setting), and
# refuses any value but a tensor, int, float or dict: "shards" (bytes or None) cannot be flattened. No
# encoding of it can: its size depends on the world size, and DCP refuses a tensor whose size differs
# from the template's, or a template key the checkpoint lacks (so no per-world key either), while a
# Python int big enough to hold it is unreadable by torch.load(weights_only=True) (pickle's LONG4).
# torch does not tell the optimizer which form it will make, so state_dict() looks for the call.
_FLATTENING_CALLER = ("torch.distributed.checkpoint.state_dict", "_get_optim_state_dict")


def flattening_requested(depth: int = 8) -> bool:
    """Whether torch's ``get_optimizer_state_dict`` (or ``set_``'s template) is asking, with flattening on.

    Looks at most ``depth`` frames up the current call stack for torch's ``_get_optim_state_dict`` and
    reads its options. Any other caller (``torch.save(opt.state_dict())``, the Guard, DCP without
    flattening) gets the full state. If a later torch renames the function, this answers ``False`` and
    torch's own ``NotImplementedError`` ("Flattening optimizer state_dict only supports ...") says so:
    nothing is saved wrong.
    """
    frame = _caller(_FLATTENING_CALLER, depth)
    return frame is not None and bool(getattr(frame.f_locals.get("info"), "flatten_optimizer_state_dict", False))


# torch's set_optimizer_state_dict (and set_state_dict) loads through this function: it may ask the
# optimizer for its state_dict() as a template and copy the checkpoint's values into it before it
# calls load_state_dict (full_state_dict=True with broadcast_from_rank0 does), and the template of dcp.load comes from
# get_state_dict. Both hold the live state tensors, as for every torch optimizer.
_LOAD_CALLER = ("torch.distributed.checkpoint.state_dict", "_load_optim_state_dict")


def loading_through_dcp(depth: int = 12) -> bool:
    """Whether torch's ``set_optimizer_state_dict`` (or ``set_state_dict``) is on the call stack, at most
    ``depth`` frames up. If a later torch renames the function this answers ``False``: a refused load
    is then reported as for any caller."""
    return _caller(_LOAD_CALLER, depth) is not None


def _caller(name: tuple[str, str], depth: int) -> Any:
    """The frame of function ``name`` (module, function) at most ``depth`` frames above the caller of
    this module's function, or None."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return None
        if (frame.f_globals.get("__name__"), frame.f_code.co_name) == name:
            return frame
        frame = frame.f_back
    return None


def _wire(key: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` as saved in the global layout: int16 indices widened (a copy of them; the rest is shared)."""
    return t.to(WIRE_INDEX_DTYPE) if key == "window_indices" else t


def _narrowed(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with window_indices back in int16, the state's own dtype.

    Only integer values that fit are narrowed: anything else is left for ``check_micro_state`` to refuse
    (an int32 value of 65536 + 3 must not wrap to a valid index 3).
    """
    t = state.get("window_indices")
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
        return state
    if t.numel() == 0 or (int(t.min()) >= -(2**15) and int(t.max()) < 2**15):
        state["window_indices"] = t.to(torch.int16)
    return state


def _plain(t: Any) -> torch.Tensor:
    return t.to_local() if type(t).__name__ == "DTensor" else t


def to_local(
    saved: dict[str, Any], p: torch.Tensor | None, glob: Layout, local_layout: Any, pid: Any
) -> dict[str, Any]:
    """This rank's state entry, in its shard's layout, from an entry in the global layout.

    ``p`` is the (DTensor) parameter, or ``None`` for a plain tensor (a single process loading a
    sharded checkpoint: the global layout is its own). Tensors come as ``Shard`` DTensors (each rank
    holding its chunk), replicated DTensors, or plain full tensors; anything with another shape is
    left for the caller's shape check to refuse.
    """
    spec = shard_spec(p) if p is not None else None
    out = {k: v for k, v in saved.items() if k not in ("row_ids", "shards")}
    rows = saved["row_ids"]
    if spec is None:
        full_rows = _gathered(rows)
        if not torch.equal(full_rows.cpu().long(), torch.arange(full_rows.numel())):
            raise ValueError(f"the loaded 'row_ids' of parameter {pid!r} are not 0..rows-1; the checkpoint is corrupt")
        for key in (*MICRO_KEYS, *DENSE_KEYS):
            if key in saved:
                out[key] = _gathered(saved[key])
        return _narrowed(out)
    a, b = _chunk(spec.rows, spec.world, spec.rank)
    s, e = spec.element_range(spec.rank)
    local_rows = _plain(rows)
    sharded_rows = _is_sharded(rows)
    if sharded_rows and not torch.equal(local_rows.cpu().long(), torch.arange(a, b)):
        got = local_rows.cpu().long()
        span = f"{int(got[0])}..{int(got[-1])}" if got.numel() else "none"
        raise ValueError(
            f"the loaded state of parameter {pid!r} holds rows {span}, but this rank holds rows "
            f"{a}..{b - 1}: it was saved by another rank. Load each rank's own file, or save and load "
            "with torch.distributed.checkpoint (get_/set_optimizer_state_dict), which reshards"
        )
    if "exp_avg" in saved:
        for key in DENSE_KEYS:
            t = saved[key]
            if _is_sharded(t):
                out[key] = t.to_local()
            else:
                out[key] = _plain(t)[a:b] if _plain(t).dim() else _plain(t)
        out["numel"] = e - s
        return out
    lay = local_layout(e - s)
    out["numel"] = e - s
    exact = _own_shard(saved.get("shards"), spec, pid)
    if exact is not None:
        out.update(exact)
        return out
    aligned = is_aligned(spec, glob, local_layout)
    sharded = [_is_sharded(saved[k]) for k in MICRO_KEYS]
    if aligned and all(sharded):
        for key in MICRO_KEYS:
            out[key] = saved[key].to_local()
        return _narrowed(out)
    full = _narrowed({k: _gathered(saved[k]) for k in MICRO_KEYS})
    from microadam.optimizer import check_micro_state

    check_micro_state(pid, full, glob)
    if aligned:  # exact: this rank's blocks are whole global blocks
        b0, q0 = s // glob.block, s // glob.quant_block
        out["window_indices"] = full["window_indices"][:, b0 : b0 + lay.num_blocks]
        out["window_values"] = full["window_values"][:, b0 : b0 + lay.num_blocks]
        out["error_codes"] = full["error_codes"][s // 2 : s // 2 + (e - s + 1) // 2]
        out["error_bounds"] = full["error_bounds"][q0 : q0 + lay.num_quant_blocks]
        return out
    out.update(_recut([(0, full, glob)], s, lay))
    return out


def _own_shard(blob: Any, spec: ShardSpec, pid: Any) -> dict[str, torch.Tensor] | None:
    """This rank's exact state from the "shards" blob, if it was saved with this very sharding."""
    if not blob:
        return None
    if not isinstance(blob, (bytes, bytearray)):
        raise ValueError(f"the loaded 'shards' of parameter {pid!r} is {type(blob).__name__}, expected bytes")
    try:
        saved = torch.load(io.BytesIO(blob), weights_only=True)
        ranges = [tuple(r) for r in saved["ranges"]]
        states = saved["states"]
    except Exception as e:  # any damage: the blob is only a shortcut, so say so and stop
        raise ValueError(
            f"the loaded 'shards' of parameter {pid!r} cannot be read ({e}); the checkpoint is corrupt"
        ) from e
    here = [spec.element_range(r) for r in range(spec.world)]
    if ranges != here or len(states) != spec.world:
        return None
    return dict(states[spec.rank])


def _is_sharded(t: Any) -> bool:
    return type(t).__name__ == "DTensor" and any(pl.is_shard() for pl in t.placements)


def _gathered(t: Any) -> torch.Tensor:
    """The whole tensor: a sharded DTensor is gathered (a collective), a replicated one unwrapped."""
    if type(t).__name__ == "DTensor":
        if not _is_sharded(t):
            return t.to_local()
        if t.dtype == torch.int16:  # gloo and NCCL cannot gather int16 (see the module docstring)
            return t.to(torch.int32).full_tensor().to(torch.int16)
        return t.full_tensor()
    return t
