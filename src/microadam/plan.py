"""Will my model fit? Memory of training with MicroAdam and its peers, before running anything.

:func:`plan_memory` takes a model -- a Hugging Face ``config.json`` (or a folder
holding one, or a hub name), a ``.safetensors`` file or folder of them, a live
``torch.nn.Module``, or a bare parameter count such as ``"7e9"`` -- and returns
the bytes of weights, gradients and optimizer state for each optimizer, and
whether they fit a GPU. :func:`largest_model` answers the reverse question:
the largest model that fits a GPU with each optimizer. ``microadam plan``
prints both.

Optimizer state is computed per tensor, because several optimizers allocate
by tensor size: MicroAdam's Top-K blocks (:func:`microadam.layout.layout_for`),
the 8-bit and 4-bit optimizers' thresholds below which a tensor keeps 32-bit
state, Adafactor's row and column factors, GaLore's projectors. Each formula
below was derived by instantiating the real optimizer on small tensors, taking
a step and reading ``microadam.state_bytes``; ``tests/test_plan.py`` checks the
formulas against the real optimizers on a small transformer. Versions checked:
bitsandbytes 0.50.2, torchao 0.18.0, galore-torch 1.0, adam-mini 1.1.1, torch 2.13.

A bare parameter count carries no shapes; it is modelled as large tensors,
square ``4096 x 4096`` matrices (the hidden size of 7B-class models) plus one
partial matrix and a 1-D remainder. This is what decides GaLore's and
Adafactor's figures, which depend on matrix sides; the others are within a
fraction of a percent of any other split into large tensors.

Units: every figure is in bytes; the printed tables use GiB (2**30 bytes).
Not counted: the CUDA context (about 0.5-1 GiB), temporaries of the forward,
backward and optimizer step, allocator fragmentation, and activations unless
a batch size and sequence length are given (then an estimate, labelled so).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microadam.layout import MAX_BLOCK_SIZE, layout_for

if TYPE_CHECKING:
    import torch

__all__ = [
    "ActivationEstimate",
    "Budget",
    "GPUS",
    "MemoryPlan",
    "ModelFit",
    "ModelSpec",
    "OPTIMIZERS",
    "OptimizerMemory",
    "PlanSettings",
    "TensorSpec",
    "estimate_activations",
    "format_largest",
    "format_plan",
    "largest_model",
    "load_model",
    "parse_budget",
    "parse_param_count",
    "plan_memory",
    "read_safetensors_header",
]

GiB = 2**30
# A bare parameter count is modelled as square matrices of this side.
COUNT_MATRIX_DIM = 4096

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# Total memory of each card in MiB. Where marked, the figure nvidia-smi reports as
# "Total" (the card's capacity less what the driver reserves); otherwise the nominal
# capacity in GiB. The CUDA context takes another 0.5-1 GiB of it at run time.
GPUS: dict[str, int] = {
    "T4-16GB": 15360,  # nvidia-smi
    "V100-16GB": 16384,
    "V100-32GB": 32768,
    "A10G-24GB": 23028,  # nvidia-smi
    "L4-24GB": 23034,  # nvidia-smi
    "RTX3090-24GB": 24576,
    "RTX4090-24GB": 24564,  # nvidia-smi
    "A100-40GB": 40960,
    "L40S-48GB": 46068,  # nvidia-smi
    "A6000-48GB": 49140,  # nvidia-smi
    "A100-80GB": 81920,  # nvidia-smi
    "H100-80GB": 81559,  # nvidia-smi
    "H200-141GB": 143771,  # nvidia-smi
}

# safetensors dtype names -> bytes per element (the format's specification).
_SAFETENSORS_DTYPES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0"}
# The header of a safetensors file is JSON; the format caps it at 100 MB.
_MAX_HEADER = 100_000_000


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class TensorSpec:
    """``count`` trainable tensors of one name pattern and shape.

    Attributes:
        name: parameter name, with ``*`` for the layer index when ``count > 1``.
        shape: the tensor's shape.
        count: how many tensors of this shape (e.g. one per layer).
        dtype: the dtype stored in the checkpoint (``"BF16"``...), ``None`` when unknown.
    """

    name: str
    shape: tuple[int, ...]
    count: int = 1
    dtype: str | None = None

    @property
    def numel(self) -> int:
        """Elements of one tensor."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelSpec:
    """The trainable tensors of a model, and what an activation estimate needs.

    Attributes:
        source: what was read (path, hub name or count as given).
        kind: ``"config"``, ``"safetensors"``, ``"module"`` or ``"count"``.
        tensors: the trainable tensors, grouped by shape.
        hidden_size, num_layers, num_heads, vocab_size: from a config, for the
            activation estimate; ``None`` when unknown.
        notes: assumptions made while reading, printed with the plan.
    """

    source: str
    kind: str
    tensors: tuple[TensorSpec, ...]
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    vocab_size: int | None = None
    notes: tuple[str, ...] = ()

    @property
    def num_params(self) -> int:
        """Trainable parameters (elements), tied weights counted once."""
        return sum(t.numel * t.count for t in self.tensors)

    @property
    def num_tensors(self) -> int:
        """Trainable tensors."""
        return sum(t.count for t in self.tensors)

    @classmethod
    def from_module(cls, module: torch.nn.Module, *, name: str | None = None) -> ModelSpec:
        """The trainable parameters of a live module (shared parameters once)."""
        tensors = tuple(
            TensorSpec(n, tuple(p.shape), dtype=str(p.dtype).removeprefix("torch."))
            for n, p in module.named_parameters()
            if p.requires_grad
        )
        return cls(source=name or type(module).__name__, kind="module", tensors=tensors)

    @classmethod
    def from_count(cls, num_params: int, *, source: str | None = None, dim: int = COUNT_MATRIX_DIM) -> ModelSpec:
        """A bare count as large tensors: ``dim x dim`` matrices, one partial matrix, a 1-D rest."""
        _check_positive_int("num_params", num_params)
        full, rest = divmod(num_params, dim * dim)
        rows, tail = divmod(rest, dim)
        tensors = []
        if full:
            tensors.append(TensorSpec("matrix.*", (dim, dim), full))
        if rows:
            tensors.append(TensorSpec("matrix.last", (rows, dim)))
        if tail:
            tensors.append(TensorSpec("rest", (tail,)))
        note = f"a bare count is modelled as large tensors: {dim}x{dim} matrices (see microadam.plan)"
        return cls(source=source or f"{num_params:,}", kind="count", tensors=tuple(tensors), notes=(note,))


_COUNT_RE = re.compile(r"^\s*([+-]?(?:\d[\d_,]*)?\.?\d*(?:e[+-]?\d+)?)\s*([kmbgt]?)\s*$", re.IGNORECASE)
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def _looks_like_count(text: str) -> bool:
    m = _COUNT_RE.match(text)
    return bool(m and re.search(r"\d", m.group(1)))


def parse_param_count(text: str | int | float) -> int:
    """Parse a parameter count: ``7e9``, ``125M``, ``1.3B``, ``350k``, ``1_000_000`` -> elements.

    Suffixes k, M, B (or G) and T are powers of 1000. Raises ``ValueError``
    for anything else, for a count that is not positive, or not a whole number.
    """
    if isinstance(text, bool):
        raise TypeError(f"parameter count must be a number or a string such as '7e9', got bool {text!r}")
    # Decimal, not float: a count is exact however large (9007199254740993 is not 2**53 + 0).
    if isinstance(text, (int, float)):
        value = Decimal(text)
        shown = repr(text)
    elif isinstance(text, str):
        m = _COUNT_RE.match(text)
        if not _looks_like_count(text) or m is None:
            raise ValueError(f"Invalid model parameter count: {text!r}; write it as 7e9, 6.74B, 125M or 350k")
        try:
            value = Decimal(m.group(1).replace("_", "").replace(",", "")) * _SUFFIX[m.group(2).lower()]
        except ArithmeticError:
            raise ValueError(f"Invalid model parameter count: {text!r}; write it as 7e9, 6.74B, 125M or 350k") from None
        shown = repr(text)
    else:
        raise TypeError(f"parameter count must be a number or a string such as '7e9', got {type(text).__name__}")
    if value.is_nan():
        raise ValueError(f"Invalid model parameter count: {shown}; it is not a number; give one such as 7e9")
    if not math.isfinite(float(value)):  # the plan's byte counts are floats
        raise ValueError(f"Invalid model parameter count: {shown}; it is too large (not a finite number), e.g. 7e9")
    if value <= 0:
        raise ValueError(f"Invalid model parameter count: {shown}; it must be > 0, e.g. 7e9 or 1.3B")
    whole = value.to_integral_value()
    if abs(value - whole) > Decimal("1e-6") * max(Decimal(1), value):
        raise ValueError(f"Invalid model parameter count: {shown}; it must be a whole number of parameters")
    if whole < 1:
        raise ValueError(f"Invalid model parameter count: {shown}; it is less than one parameter, e.g. 7e9")
    return int(whole)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"Invalid {name}: {value}; it must be >= 1")


# -- config.json ---------------------------------------------------------------------

_DECODERS = ("llama", "mistral", "qwen2", "qwen3")
_KNOWN_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "LlamaModel"),
    "mistral": ("MistralForCausalLM", "MistralModel"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Model"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Model"),
    "gpt2": ("GPT2LMHeadModel", "GPT2Model"),
    "bert": ("BertModel", "BertForMaskedLM", "BertForSequenceClassification"),
}


# Config fields that size tensors (or divide one size by another, as hidden_size / num_attention_heads):
# each, when given, must be a positive int, or the count is nonsense or a ZeroDivisionError.
_SIZE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "type_vocab_size",
    "num_local_experts",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "n_positions",
)


def _check_sizes(cfg: dict[str, Any], source: str) -> None:
    for key in _SIZE_KEYS:
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{source}: {key} must be a positive int, got {value!r}; fix it in the config")


def _require(cfg: dict[str, Any], source: str, *keys: str) -> int:
    """The first of ``keys`` present in the config, as a positive int."""
    for key in keys:
        if cfg.get(key) is not None:
            value = cfg[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{source}: {key} must be a positive int, got {value!r}; fix it in the config")
            return value
    raise ValueError(f"{source}: the config has no {' or '.join(keys)}; it is needed to count the parameters")


def _transformers_major() -> int | None:
    """The installed transformers' major version (read from its metadata, without importing it), or None."""
    from importlib import metadata

    try:
        return int(metadata.version("transformers").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return None


# transformers' num_key_value_heads where a config leaves it out (5.x; Llama's is num_attention_heads):
# Mistral's 8 and Qwen's 32 change the count of a config that relies on them.
_KV_HEADS_DEFAULT = {"mistral": 8, "qwen2": 32, "qwen3": 32}


def _decoder_tensors(cfg: dict[str, Any], source: str, with_head: bool) -> tuple[list[TensorSpec], list[str]]:
    """The tensors of a Llama-family decoder, and the fields taken from transformers' defaults."""
    mt = cfg["model_type"]
    H = _require(cfg, source, "hidden_size")
    I = _require(cfg, source, "intermediate_size")  # noqa: E741 - the paper's name
    L = _require(cfg, source, "num_hidden_layers")
    V = _require(cfg, source, "vocab_size")
    nh = _require(cfg, source, "num_attention_heads")
    defaulted = []
    nkv = cfg.get("num_key_value_heads")
    if nkv is None:
        nkv = _KV_HEADS_DEFAULT.get(mt, nh)
        if mt in _KV_HEADS_DEFAULT:
            defaulted.append(f"num_key_value_heads={nkv}")
    hd = cfg.get("head_dim") or (128 if mt == "qwen3" else H // nh)
    attn_bias = bool(cfg.get("attention_bias", False))
    qkv_bias, o_bias = (True, False) if mt == "qwen2" else (attn_bias, attn_bias)
    mlp_bias = mt == "llama" and bool(cfg.get("mlp_bias", False))
    layer = "model.layers.*."
    t = [TensorSpec("model.embed_tokens.weight", (V, H))]
    for proj, rows in (("q_proj", nh * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
        t.append(TensorSpec(f"{layer}self_attn.{proj}.weight", (rows, H), L))
        if qkv_bias:
            t.append(TensorSpec(f"{layer}self_attn.{proj}.bias", (rows,), L))
    t.append(TensorSpec(f"{layer}self_attn.o_proj.weight", (H, nh * hd), L))
    if o_bias:
        t.append(TensorSpec(f"{layer}self_attn.o_proj.bias", (H,), L))
    if mt == "qwen3":
        t += [TensorSpec(f"{layer}self_attn.{n}.weight", (hd,), L) for n in ("q_norm", "k_norm")]
    for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
        t.append(TensorSpec(f"{layer}mlp.{proj}.weight", shape, L))
        if mlp_bias:
            t.append(TensorSpec(f"{layer}mlp.{proj}.bias", shape[:1], L))
    t += [TensorSpec(f"{layer}{n}.weight", (H,), L) for n in ("input_layernorm", "post_attention_layernorm")]
    t.append(TensorSpec("model.norm.weight", (H,)))
    if with_head and not cfg.get("tie_word_embeddings", False):
        t.append(TensorSpec("lm_head.weight", (V, H)))
    return t, defaulted


def _gpt2_tensors(cfg: dict[str, Any], source: str, with_head: bool) -> list[TensorSpec]:
    H = _require(cfg, source, "n_embd", "hidden_size")
    L = _require(cfg, source, "n_layer", "num_hidden_layers")
    V = _require(cfg, source, "vocab_size")
    P = _require(cfg, source, "n_positions", "max_position_embeddings")
    I = cfg.get("n_inner") or 4 * H  # noqa: E741
    h = "transformer.h.*."
    t = [TensorSpec("transformer.wte.weight", (V, H)), TensorSpec("transformer.wpe.weight", (P, H))]
    # GPT-2 uses Conv1D: weights are stored (in, out).
    for name, shape in (
        ("ln_1", None),
        ("attn.c_attn", (H, 3 * H)),
        ("attn.c_proj", (H, H)),
        ("ln_2", None),
        ("mlp.c_fc", (H, I)),
        ("mlp.c_proj", (I, H)),
    ):
        if shape is None:
            t += [TensorSpec(f"{h}{name}.weight", (H,), L), TensorSpec(f"{h}{name}.bias", (H,), L)]
        else:
            t += [TensorSpec(f"{h}{name}.weight", shape, L), TensorSpec(f"{h}{name}.bias", shape[1:], L)]
    t += [TensorSpec("transformer.ln_f.weight", (H,)), TensorSpec("transformer.ln_f.bias", (H,))]
    if with_head and not cfg.get("tie_word_embeddings", True):
        t.append(TensorSpec("lm_head.weight", (V, H)))
    return t


def _bert_tensors(cfg: dict[str, Any], source: str, arch: str) -> list[TensorSpec]:
    H = _require(cfg, source, "hidden_size")
    I = _require(cfg, source, "intermediate_size")  # noqa: E741
    L = _require(cfg, source, "num_hidden_layers")
    V = _require(cfg, source, "vocab_size")
    P = _require(cfg, source, "max_position_embeddings")
    T = cfg.get("type_vocab_size", 2)

    def linear(name: str, out: int, inp: int, count: int = 1) -> list[TensorSpec]:
        return [TensorSpec(f"{name}.weight", (out, inp), count), TensorSpec(f"{name}.bias", (out,), count)]

    def norm(name: str, count: int = 1) -> list[TensorSpec]:
        return [TensorSpec(f"{name}.weight", (H,), count), TensorSpec(f"{name}.bias", (H,), count)]

    e, x = "bert.embeddings.", "bert.encoder.layer.*."
    t = [
        TensorSpec(f"{e}word_embeddings.weight", (V, H)),
        TensorSpec(f"{e}position_embeddings.weight", (P, H)),
        TensorSpec(f"{e}token_type_embeddings.weight", (T, H)),
        *norm(f"{e}LayerNorm"),
    ]
    for n in ("query", "key", "value"):
        t += linear(f"{x}attention.self.{n}", H, H, L)
    t += linear(f"{x}attention.output.dense", H, H, L) + norm(f"{x}attention.output.LayerNorm", L)
    t += (
        linear(f"{x}intermediate.dense", I, H, L)
        + linear(f"{x}output.dense", H, I, L)
        + norm(f"{x}output.LayerNorm", L)
    )
    if arch == "BertForMaskedLM":
        t += linear("cls.predictions.transform.dense", H, H) + norm("cls.predictions.transform.LayerNorm")
        t.append(TensorSpec("cls.predictions.bias", (V,)))  # the decoder's weight is the word embeddings
        if not cfg.get("tie_word_embeddings", True):
            t.append(TensorSpec("cls.predictions.decoder.weight", (V, H)))
            # transformers 5 ties decoder.bias to cls.predictions.bias only with the embeddings
            # (_tied_weights_keys); 4.x shared it always (decoder.bias = self.bias in __init__).
            major = _transformers_major()
            if major is None or major >= 5:
                t.append(TensorSpec("cls.predictions.decoder.bias", (V,)))
    else:
        t += linear("bert.pooler.dense", H, H)
    if arch == "BertForSequenceClassification":
        labels = cfg.get("num_labels") or len(cfg.get("id2label") or {}) or 2
        t += linear("classifier", labels, H)
    return t


def _group(named: Iterable[tuple[str, tuple[int, ...], str | None]]) -> tuple[TensorSpec, ...]:
    """Group tensors whose names differ only by a layer index and that share a shape."""
    counts: dict[tuple[str, tuple[int, ...], str | None], int] = {}
    for name, shape, dtype in named:
        key = (re.sub(r"\.\d+\.", ".*.", name), shape, dtype)
        counts[key] = counts.get(key, 0) + 1
    return tuple(TensorSpec(n, s, c, d) for (n, s, d), c in counts.items())


# Fields whose transformers default, when a config leaves them out, changes the count: named in a note.
_DEFAULTED_KEYS = (
    *_SIZE_KEYS,
    "num_experts",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "d_model",
    "d_ff",
    "d_kv",
    "num_layers",
    "num_decoder_layers",
    "num_heads",
    "tie_word_embeddings",
)


def _unknown_model_type(mt: str, source: str, known: Iterable[str]) -> ValueError:
    """A short error for a model_type transformers does not know; its full list has 800+ names."""
    import difflib

    close = difflib.get_close_matches(mt, list(known), n=5, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}" if close else "no close match"
    return ValueError(
        f"{source}: transformers does not know model_type {mt!r} ({hint}); list all with: python -c "
        '"from transformers import CONFIG_MAPPING; print(sorted(CONFIG_MAPPING))", or upgrade transformers'
    )


def _tensors_via_transformers(
    cfg: dict[str, Any], source: str, arch: str | None
) -> tuple[tuple[TensorSpec, ...], list[str]]:
    """Build the model on the meta device with transformers; its parameters, and the defaulted fields.

    The second item names each field in :data:`_DEFAULTED_KEYS` that ``cfg`` leaves out and
    transformers filled in with its default (``vocab_size=32000``), so the printed plan says so.
    """
    mt = cfg.get("model_type")
    try:
        import torch
        import transformers
    except ImportError:
        raise ImportError(
            f"{source}: model_type {mt!r} (architecture {arch!r}) is not one microadam plan counts by hand "
            f"({', '.join(_KNOWN_ARCHITECTURES)}); counting it needs transformers: pip install transformers"
        ) from None
    if not mt:
        raise ValueError(f"{source}: the config has no model_type, so the architecture is unknown")
    if mt not in transformers.CONFIG_MAPPING:
        raise _unknown_model_type(mt, source, transformers.CONFIG_MAPPING.keys())
    kwargs = {k: v for k, v in cfg.items() if k != "model_type"}
    try:
        config = transformers.AutoConfig.for_model(mt, **kwargs)
        model_cls = getattr(transformers, arch, None) if arch else None
        with torch.device("meta"):
            if model_cls is not None:
                model = model_cls(config)
            else:
                try:
                    model = transformers.AutoModelForCausalLM.from_config(config)
                except ValueError:
                    model = transformers.AutoModel.from_config(config)
    except Exception as e:  # transformers raises many types for a config it cannot build
        raise ValueError(f"{source}: transformers could not build model_type {mt!r}: {e}") from e
    # A field is given if the config names it or an alias of it (gpt2's n_embd is hidden_size).
    aliases = dict(getattr(config, "attribute_map", {}) or {})
    given = set(cfg) | {aliases[k] for k in cfg if k in aliases} | {a for a, k in aliases.items() if k in cfg}
    built = config.to_dict()
    defaulted = [f"{k}={built[k]!r}" for k in _DEFAULTED_KEYS if built.get(k) is not None and k not in given]
    tensors = _group(
        (n, tuple(p.shape), str(p.dtype).removeprefix("torch.")) for n, p in model.named_parameters() if p.requires_grad
    )
    return tensors, defaulted


def _defaults_note(defaulted: Sequence[str]) -> list[str]:
    if not defaulted:
        return []
    return [
        f"fields the config does not give were taken from transformers' defaults: {', '.join(defaulted)}; "
        "add them to the config if the model differs"
    ]


def _model_from_config(cfg: dict[str, Any], source: str) -> ModelSpec:
    if not isinstance(cfg, dict):
        raise ValueError(f"{source}: a config.json holds a JSON object, got {type(cfg).__name__}")
    _check_sizes(cfg, source)
    mt = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs and isinstance(archs[0], str) else None
    notes: list[str] = []
    known = _KNOWN_ARCHITECTURES.get(mt or "", ())
    if known and (arch is None or arch in known):
        if arch is None:
            arch = known[0]
            notes.append(f"the config names no architecture; counted as {arch}")
        if mt in _DECODERS:
            tensors, defaulted = _decoder_tensors(cfg, source, with_head=arch.endswith("ForCausalLM"))
            notes += _defaults_note(defaulted)
        elif mt == "gpt2":
            tensors = _gpt2_tensors(cfg, source, with_head=arch == "GPT2LMHeadModel")
        else:
            tensors = _bert_tensors(cfg, source, arch)
        tensors = tuple(tensors)
    elif known:
        # A known family with a task head not counted by hand: exact with transformers, else the base model.
        try:
            tensors, defaulted = _tensors_via_transformers(cfg, source, arch)
            notes.append(f"{arch} counted by building it on the meta device with transformers")
            notes += _defaults_note(defaulted)
        except ImportError:
            tensors = tuple(_model_from_config({**cfg, "architectures": [known[0]]}, source).tensors)
            notes.append(f"{arch}'s task head is not counted (install transformers to count it); base {known[0]}")
    else:
        tensors, defaulted = _tensors_via_transformers(cfg, source, arch)
        notes.append(f"{arch or mt} counted by building it on the meta device with transformers")
        notes += _defaults_note(defaulted)
    dims = _model_from_config_dims(cfg)
    return ModelSpec(source=source, kind="config", tensors=tensors, notes=tuple(notes), **dims)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"Cannot read config {str(path)!r}: {e.strerror or e}; pass a readable config.json") from e
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{str(path)!r} is neither a config.json (not UTF-8 text) nor a .safetensors file; pass one of those"
        ) from e
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"Config {str(path)!r} is not valid JSON ({e}); pass a Hugging Face config.json") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"Config {str(path)!r} holds a JSON {type(cfg).__name__}, not an object")
    return cfg


# -- safetensors ------------------------------------------------------------------------


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON header of a ``.safetensors`` file: ``{name: {"dtype", "shape", "data_offsets"}}``.

    Reads only the first ``8 + N`` bytes: an unsigned 64-bit little-endian N,
    then N bytes of JSON. Raises ``ValueError`` naming the file for anything else.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError(f"{str(path)!r} is not a safetensors file: {len(raw)} bytes, the header needs 8")
            (n,) = struct.unpack("<Q", raw)
            size = path.stat().st_size
            if n > _MAX_HEADER or 8 + n > size:
                raise ValueError(
                    f"{str(path)!r} is not a safetensors file: header length {n} for a file of {size} bytes"
                )
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise ValueError(f"Cannot read {str(path)!r}: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not a safetensors file: its header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{str(path)!r} is not a safetensors file: its header is a JSON {type(header).__name__}")
    return header


def _model_from_safetensors(files: Sequence[Path], source: str) -> ModelSpec:
    named: list[tuple[str, tuple[int, ...], str | None]] = []
    skipped = 0
    for file in files:
        for name, info in read_safetensors_header(file).items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape = info["dtype"], tuple(int(s) for s in info["shape"])
                begin, end = info["data_offsets"]
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{str(file)!r}: tensor {name!r} has a malformed header entry {info!r}") from e
            if dtype not in _SAFETENSORS_DTYPES:
                raise ValueError(f"{str(file)!r}: tensor {name!r} has unknown dtype {dtype!r}")
            if end - begin != math.prod(shape) * _SAFETENSORS_DTYPES[dtype]:
                raise ValueError(
                    f"{str(file)!r}: tensor {name!r} of shape {list(shape)} and dtype {dtype} spans "
                    f"{end - begin} bytes, not {math.prod(shape) * _SAFETENSORS_DTYPES[dtype]}"
                )
            if dtype not in _FLOAT_DTYPES:
                skipped += 1  # integer tensors are buffers (position ids...), not trainable
                continue
            named.append((name, shape, dtype))
    notes = [f"{skipped} integer/bool tensors skipped (buffers, not trainable)"] if skipped else []
    return ModelSpec(source=source, kind="safetensors", tensors=_group(named), notes=tuple(notes))


# -- dispatch ---------------------------------------------------------------------------

_HUB_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _model_from_hub(name: str) -> ModelSpec:
    try:
        import transformers
    except ImportError:
        raise ImportError(
            f"{name!r} is not a file or folder here; to read it as a Hugging Face hub name, "
            "pip install transformers (or pass a path to its config.json)"
        ) from None
    try:
        config = transformers.AutoConfig.from_pretrained(name)
    except Exception as e:  # OSError offline, ValueError for a bad repo, HTTP errors...
        first_line = (str(e).splitlines() or [""])[0]
        raise ValueError(
            f"{name!r} is no file or folder here, and loading it as a Hugging Face hub name failed: "
            f"{type(e).__name__}: {first_line}. Offline or gated? Download its config.json and pass that path"
        ) from e
    return _model_from_config(config.to_dict(), name)


def load_model(model: ModelSpec | str | os.PathLike[str] | int | float | torch.nn.Module) -> ModelSpec:
    """Read a model's trainable tensors from whatever names it.

    Args:
        model: a parameter count (``7e9``, ``"125M"``, ``"1.3B"``); a path to a
            ``config.json``, a ``.safetensors`` file, or a folder with
            ``*.safetensors`` (read in preference; with a
            ``model.safetensors.index.json``, only the shards its ``weight_map``
            names, so a consolidated copy beside them is not counted twice; a
            ``config.json`` beside them supplies the dimensions for the
            activation estimate) or a ``config.json``; a
            ``*.safetensors.index.json``; a Hugging Face hub name (``"org/name"``, needs
            transformers and a network); or a ``torch.nn.Module``.

    Raises:
        ValueError: a count that is not positive, a path that does not exist or
            cannot be read, a config that lacks a needed field.
        ImportError: an architecture not counted by hand, or a hub name, without transformers.
    """
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, (int, float)) and not isinstance(model, bool):
        n = parse_param_count(model)
        return ModelSpec.from_count(n, source=f"{model:g}" if isinstance(model, float) else f"{n:,}")
    if isinstance(model, str) and not model.strip():
        # Path("") is the current folder: an empty argument (an unset shell variable) planned whatever it held.
        raise ValueError(
            "the model is an empty string; give a parameter count (7e9), a config.json, a folder, or '.' "
            "for the current folder"
        )
    if not isinstance(model, (str, os.PathLike)):
        import torch

        if isinstance(model, torch.nn.Module):
            return ModelSpec.from_module(model)
        raise TypeError(
            f"model must be a path, hub name, parameter count or torch.nn.Module, got {type(model).__name__}"
        )
    text = os.fspath(model)
    if isinstance(model, str) and _looks_like_count(text):
        if Path(text).expanduser().exists():
            # "125m" may be a folder here too: a count is what it reads as, but not in silence.
            warnings.warn(
                f"{text!r} is read as a parameter count, though a file or folder of that name exists here; "
                f"pass ./{text} to read the model from it",
                UserWarning,
                stacklevel=2,
            )
        return ModelSpec.from_count(parse_param_count(text), source=text.strip())
    path = Path(text).expanduser()
    if path.is_file() and path.name.endswith(".safetensors.index.json"):
        shards = _index_shards(path)
        if not shards:
            raise ValueError(f"{text!r} has an empty weight_map, so it names no shards; pass the folder instead")
        spec = _model_from_safetensors(shards, text)
        config = path.parent / "config.json"
        return replace(spec, **_model_from_config_dims(_read_config(config))) if config.is_file() else spec
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        # With an index, only the shards it names: a consolidated copy saved beside the shards
        # (as some checkpoints ship) would otherwise count every weight twice. An index with an
        # empty weight_map names nothing, so every *.safetensors is read, as without one.
        indexed = _index_shards(index) if index.is_file() else []
        shards = indexed or sorted(path.glob("*.safetensors"))
        config = path / "config.json"
        if shards:
            spec = _model_from_safetensors(shards, text)
            if indexed:
                spec = replace(spec, notes=(*spec.notes, f"read the {len(shards)} shard(s) named by {index.name}"))
            if config.is_file():
                dims = _model_from_config_dims(_read_config(config))
                spec = replace(spec, **dims)
            return spec
        if config.is_file():
            return _model_from_config(_read_config(config), text)
        raise ValueError(f"Folder {text!r} holds neither *.safetensors nor config.json; pass a model folder")
    if path.is_file():
        if path.suffix == ".safetensors":
            return _model_from_safetensors([path], text)
        return _model_from_config(_read_config(path), text)
    if path.suffix in (".json", ".safetensors") or text.startswith(("/", ".", "~")):
        raise ValueError(
            f"Cannot read model {text!r}: no such file or folder; pass a config.json, a .safetensors file, "
            "a folder of them, a hub name or a parameter count such as 7e9"
        )
    if _HUB_RE.match(text):
        return _model_from_hub(text)
    raise ValueError(
        f"Cannot read model {text!r}: not a file, folder, hub name (org/name) or parameter count (e.g. 7e9, 1.3B)"
    )


def _index_shards(index: Path) -> list[Path]:
    """The shard files named by a ``*.safetensors.index.json`` (its ``weight_map`` values), beside it."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"Cannot read the safetensors index {str(index)!r}: {e}; pass the folder or a shard") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ValueError(
            f"{str(index)!r} has no weight_map of tensor name -> shard file; pass the folder or a .safetensors file"
        )
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [str(f.name) for f in shards if not f.is_file()]
    if missing:
        raise ValueError(f"{str(index)!r} names shards that are not beside it: {missing}; download them first")
    return shards


def _model_from_config_dims(cfg: dict[str, Any]) -> dict[str, int | None]:
    dims = {
        "hidden_size": cfg.get("hidden_size", cfg.get("n_embd")),
        "num_layers": cfg.get("num_hidden_layers", cfg.get("n_layer")),
        "num_heads": cfg.get("num_attention_heads", cfg.get("n_head")),
        "vocab_size": cfg.get("vocab_size"),
    }
    return {k: v if isinstance(v, int) and not isinstance(v, bool) else None for k, v in dims.items()}


# --------------------------------------------------------------------------- budgets


@dataclass(frozen=True)
class Budget:
    """GPU memory to fit in: ``name`` as given or the card's, ``bytes`` of it."""

    name: str
    bytes: int


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(b|kb|mb|gb|tb|kib|mib|gib|tib)\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_budget(gpu: str | int | Budget) -> Budget:
    """A GPU budget from a card name (``"A100-80GB"``, see :data:`GPUS`) or a size.

    Sizes: ``"24GB"`` is 24 * 10**9 bytes, ``"24GiB"`` is 24 * 2**30; an int is
    bytes. Card names are matched case-insensitively, and a unique prefix is
    enough (``"h100"``). Raises ``ValueError`` listing the known cards.
    """
    if isinstance(gpu, Budget):
        return gpu
    if isinstance(gpu, int) and not isinstance(gpu, bool):
        if gpu <= 0:
            raise ValueError(f"Invalid gpu: {gpu}; a budget in bytes must be > 0")
        return Budget(f"{gpu / GiB:.1f} GiB", gpu)
    if not isinstance(gpu, str):
        raise TypeError(f"gpu must be a card name or a size such as '24GB', got {type(gpu).__name__} {gpu!r}")
    m = _SIZE_RE.match(gpu)
    if m:
        size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
        if size <= 0:
            raise ValueError(f"Invalid gpu: {gpu!r}; a budget must be > 0")
        return Budget(gpu.strip(), size)
    key = gpu.strip().upper().replace(" ", "-")
    matches = [name for name in GPUS if name.upper() == key] or [name for name in GPUS if name.upper().startswith(key)]
    if len(matches) == 1:
        return Budget(matches[0], GPUS[matches[0]] * 2**20)
    known = ", ".join(GPUS)
    if len(matches) > 1:
        raise ValueError(f"Ambiguous gpu: {gpu!r} matches {', '.join(matches)}; name one of them")
    raise ValueError(f"Unknown gpu: {gpu!r}; use a size such as 24GB or 80GiB, or one of: {known}")


# --------------------------------------------------------------------------- optimizers


@dataclass(frozen=True)
class PlanSettings:
    """Dtypes and optimizer hyperparameters that decide the bytes.

    Attributes:
        param_dtype: dtype of the weights, ``"fp32"`` (default: torch's, and mixed
            precision's fp32 master weights), ``"bf16"`` or ``"fp16"``.
        grad_dtype: dtype of the gradients (default: the weights').
        window, density, block_size, quant_block_size: MicroAdam's (see :class:`microadam.MicroAdam`).
        galore_rank: GaLore's projection rank r.
    """

    param_dtype: str = "fp32"
    grad_dtype: str | None = None
    window: int = 10
    density: float = 0.01
    block_size: int = 4096
    quant_block_size: int = 128
    galore_rank: int = 128

    def __post_init__(self) -> None:
        for name in ("window", "density", "block_size", "quant_block_size", "galore_rank"):
            value = getattr(self, name)
            if type(value).__module__ == "numpy" and hasattr(value, "item"):
                # A NumPy scalar (np.float32(0.01)) as a Python number, as MicroAdam takes it.
                object.__setattr__(self, name, value.item())
        for name in ("param_dtype", "grad_dtype"):
            value = getattr(self, name)
            if value is None and name == "grad_dtype":
                continue
            if value not in DTYPE_BYTES:
                raise ValueError(f"Invalid {name}: {value!r}; use one of {', '.join(DTYPE_BYTES)}")
        for name in ("window", "block_size", "quant_block_size", "galore_rank"):
            _check_positive_int(name, getattr(self, name))
        d = self.density
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < d <= 1.0:
            raise ValueError(f"Invalid density: {d!r}; it must be in (0, 1], e.g. 0.01 keeps 1% per block")
        if self.block_size > MAX_BLOCK_SIZE:
            raise ValueError(f"Invalid block_size: {self.block_size}; it must be <= {MAX_BLOCK_SIZE}")
        b, q = self.block_size, self.quant_block_size
        if b % q and q % b:
            raise ValueError(f"block_size={b} and quant_block_size={q}: one must divide the other")

    @property
    def param_bytes(self) -> int:
        """Bytes per weight."""
        return DTYPE_BYTES[self.param_dtype]

    @property
    def grad_bytes(self) -> int:
        """Bytes per gradient element."""
        return DTYPE_BYTES[self.grad_dtype or self.param_dtype]


# Each state function gives the bytes of optimizer state of one tensor. torch's AdamW keeps
# its state in the parameter's dtype: the two AdamW rows name theirs (fp32, as with fp32
# master weights, and bf16). Adafactor, GaLore and Adam-mini follow the gradients' or the
# weights' dtype (measured: with bf16 weights their state halves); bitsandbytes keeps its
# 32-bit state in fp32 whatever the weights are.


def _adamw(t: TensorSpec, s: PlanSettings) -> int:
    # exp_avg and exp_avg_sq, and a 0-d fp32 step tensor per parameter.
    return 2 * 4 * t.numel + 4


def _adamw_bf16(t: TensorSpec, s: PlanSettings) -> int:
    return 2 * 2 * t.numel + 4


# bitsandbytes AdamW8bit: uint8 m and v with an fp32 absmax per 256 elements; tensors
# under min_8bit_size=4096 elements keep fp32 m and v. The two 256-entry fp32 quantile
# maps are shared by all tensors (counted once, in _bnb_once). The step is a Python int.
_BNB_MIN_8BIT, _BNB_BLOCK = 4096, 256


def _bnb8(t: TensorSpec, s: PlanSettings) -> int:
    n = t.numel
    if n < _BNB_MIN_8BIT:
        return 2 * 4 * n
    return 2 * (n + 4 * -(-n // _BNB_BLOCK))


def _bnb_once(tensors: Sequence[TensorSpec], s: PlanSettings) -> int:
    return 2 * 256 * 4 if any(t.numel >= _BNB_MIN_8BIT for t in tensors) else 0


# torchao AdamW8bit (block 256) and AdamW4bit (block 128): codes, an fp32 scale per
# block and a per-tensor fp32 quantile map (256 entries for 8-bit, 16 for 4-bit) for
# m and v each; tensors under 4096 elements or not a multiple of the block keep m and
# v in the parameter's dtype. A 0-d fp32 step tensor per parameter.
def _torchao(t: TensorSpec, s: PlanSettings, *, bits: int, block: int) -> int:
    n = t.numel
    if n >= 4096 and n % block == 0:
        qmap = 2**bits
        return 2 * (n * bits // 8 + 4 * (n // block) + 4 * qmap) + 4
    return 2 * s.param_bytes * n + 4


def _torchao8(t: TensorSpec, s: PlanSettings) -> int:
    return _torchao(t, s, bits=8, block=256)


def _torchao4(t: TensorSpec, s: PlanSettings) -> int:
    return _torchao(t, s, bits=4, block=128)


# torch.optim.Adafactor (beta1=None, no momentum): for a tensor of 2 or more dims a row
# factor and a column factor over the last two dims; a full second moment otherwise. A
# 0-d fp32 step tensor per parameter.
def _adafactor(t: TensorSpec, s: PlanSettings) -> int:
    g = s.grad_bytes  # row_var/col_var/variance are made from the gradient (new_zeros, zeros_like)
    if len(t.shape) >= 2:
        lead = math.prod(t.shape[:-2])
        return g * lead * (t.shape[-2] + t.shape[-1]) + 4
    return g * t.numel + 4


# galore-torch GaLoreAdamW, every 2-D tensor in the GaLore group (proj_type "std"): an
# orthogonal projector of r rows of the min side (holding the whole min-side square factor in
# fp32, below) and m, v of (max side, r), with r capped by the smaller side; other tensors
# dense Adam (m, v). The step is a Python int.
def _galore(t: TensorSpec, s: PlanSettings) -> int:
    g = s.grad_bytes  # m and v are the projected gradient's dtype
    if len(t.shape) == 2:
        small, large = sorted(t.shape)
        r = min(s.galore_rank, small)
        # The projector is the first r rows (or columns) of the SVD's small x small factor, computed in
        # float32. galore-torch 1.0 casts it back to another gradient dtype (a copy of r x small), but
        # keeps a float32 gradient's as a slice, and the slice holds the whole factor alive.
        projector = 4 * small * small if g == 4 else g * r * small
        return projector + 2 * g * r * large
    return 2 * g * t.numel


# Adam-mini 1.1.1: one m per parameter; v is one per bias element, one per output row
# of a matrix (embeddings, output, value, MLP; Adam-mini keeps fewer, one per head, for
# query and key, and one per block for unnamed matrices: this counts at most that), one
# per other 1-D tensor (norms). The step is a Python int.
def _adam_mini(t: TensorSpec, s: PlanSettings) -> int:
    if "bias" in t.name.lower():
        v = t.numel
    elif len(t.shape) >= 2:
        v = t.shape[0]
    else:
        v = 1
    return s.param_bytes * (t.numel + v)  # m is zeros_like(p), v zeros_like a slice of m


# Lion: one momentum (bitsandbytes' Lion at 32 bits; lion-pytorch the same in the
# parameter's dtype).
def _lion(t: TensorSpec, s: PlanSettings) -> int:
    return 4 * t.numel


def _microadam(t: TensorSpec, s: PlanSettings) -> int:
    return layout_for(
        t.numel,
        block_size=s.block_size,
        density=s.density,
        quant_block_size=s.quant_block_size,
        window=s.window,
    ).state_bytes


def _nothing(tensors: Sequence[TensorSpec], s: PlanSettings) -> int:
    return 0


@dataclass(frozen=True)
class _Optimizer:
    key: str
    label: str
    per_tensor: Callable[[TensorSpec, PlanSettings], int]
    once: Callable[[Sequence[TensorSpec], PlanSettings], int] = _nothing
    what: str = ""

    def state_bytes(self, tensors: Sequence[TensorSpec], settings: PlanSettings) -> int:
        return sum(t.count * self.per_tensor(t, settings) for t in tensors) + self.once(tensors, settings)


OPTIMIZERS: tuple[_Optimizer, ...] = (
    _Optimizer("adamw", "AdamW, fp32 state", _adamw, what="m and v in fp32 (torch.optim.AdamW on fp32 weights)"),
    _Optimizer(
        "adamw-bf16", "AdamW, bf16 state", _adamw_bf16, what="m and v in bf16 (torch.optim.AdamW on bf16 weights)"
    ),
    _Optimizer(
        "adamw8bit-bnb",
        "8-bit AdamW (bitsandbytes)",
        _bnb8,
        _bnb_once,
        what="uint8 m, v + fp32 absmax per 256; tensors < 4096 elements fp32",
    ),
    _Optimizer(
        "adamw8bit-torchao",
        "8-bit AdamW (torchao)",
        _torchao8,
        what="uint8 m, v + fp32 scale per 256; tensors < 4096 or not a multiple of 256 unquantized",
    ),
    _Optimizer(
        "adamw4bit-torchao",
        "4-bit AdamW (torchao)",
        _torchao4,
        what="4-bit m, v + fp32 scale per 128; tensors < 4096 or not a multiple of 128 unquantized",
    ),
    _Optimizer(
        "adafactor",
        "Adafactor",
        _adafactor,
        what="torch.optim.Adafactor (no momentum): fp32 row and column factors of v; full v for 1-D",
    ),
    _Optimizer(
        "galore",
        "GaLore AdamW",
        _galore,
        what="galore-torch: rank-r projector (fp32: the whole SVD factor) + rank-r m, v per matrix; Adam for the rest",
    ),
    _Optimizer(
        "adam-mini",
        "Adam-mini",
        _adam_mini,
        what="fp32 m + one v per matrix row (fewer for Q/K: an upper bound), per bias element",
    ),
    _Optimizer(
        "lion", "Lion", _lion, what="one fp32 momentum (bitsandbytes Lion; lion-pytorch keeps it in the weights' dtype)"
    ),
    _Optimizer("microadam", "MicroAdam", _microadam, what="exact, from microadam.layout"),
)
_BY_KEY = {o.key: o for o in OPTIMIZERS}


def _label(o: _Optimizer, s: PlanSettings) -> str:
    if o.key == "galore":
        return f"{o.label} (rank {s.galore_rank})"
    if o.key == "microadam":
        return f"{o.label} (m={s.window}, density={s.density:g})"
    return o.label


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class ActivationEstimate:
    """A rough estimate of activation memory, in bytes, and the formula behind it."""

    bytes: int
    formula: str


@dataclass(frozen=True)
class OptimizerMemory:
    """Bytes of one training setup; ``fits`` is ``None`` without a budget.

    Attributes:
        key: optimizer key in :data:`OPTIMIZERS`.
        label: the name printed.
        weights, gradients, state: bytes of each.
        activations: the estimate's bytes, 0 without one.
        total: the sum of the four.
        state_per_param: optimizer state bytes per parameter.
        fits: ``total <= budget``, ``None`` without a budget.
    """

    key: str
    label: str
    weights: int
    gradients: int
    state: int
    activations: int
    total: int
    state_per_param: float
    fits: bool | None


@dataclass(frozen=True)
class MemoryPlan:
    """What :func:`plan_memory` returns: one :class:`OptimizerMemory` per optimizer."""

    model: ModelSpec
    settings: PlanSettings
    budget: Budget | None
    activations: ActivationEstimate | None
    rows: tuple[OptimizerMemory, ...]
    notes: tuple[str, ...] = field(default=())

    def row(self, key: str) -> OptimizerMemory:
        """The row of optimizer ``key`` (see :data:`OPTIMIZERS`)."""
        for r in self.rows:
            if r.key == key:
                return r
        raise KeyError(f"no optimizer {key!r}; use one of {', '.join(o.key for o in OPTIMIZERS)}")


def estimate_activations(model: ModelSpec, batch_size: int, seq_len: int) -> ActivationEstimate:
    """Rough activation bytes of a transformer step without activation checkpointing.

    Per layer ``34 * b * s * h`` bytes: 16-bit activations of attention (11sbh),
    MLP (19sbh) and layer norms (4sbh), from Korthikanti et al. 2022, "Reducing
    Activation Recomputation in Large Transformer Models", section 4.1, which
    assumes a GPT MLP of 4h; the paper's ``5 * a * s**2 * b`` of attention
    scores is left out, as FlashAttention / SDPA does not store them. Plus
    ``4 * b * s * V`` for fp32 logits of the loss. An approximation: real
    figures depend on the MLP width, kernels, and what the framework keeps.
    """
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("seq_len", seq_len)
    h, L, V = model.hidden_size, model.num_layers, model.vocab_size
    if not h or not L:
        raise ValueError(
            f"An activation estimate needs hidden_size and num_hidden_layers, which {model.source!r} "
            f"({model.kind}) does not give; pass a config.json, or leave out --batch-size/--seq-len"
        )
    V = V or 0
    total = 34 * L * batch_size * seq_len * h + 4 * batch_size * seq_len * V
    formula = (
        f"34*L*b*s*h + 4*b*s*V = 34*{L}*{batch_size}*{seq_len}*{h} + 4*{batch_size}*{seq_len}*{V} bytes "
        "(Korthikanti et al. 2022, 16-bit activations, no checkpointing, attention scores not stored; "
        "+ fp32 logits) -- a rough approximation"
    )
    return ActivationEstimate(total, formula)


def plan_memory(
    model: ModelSpec | str | os.PathLike[str] | int | float | torch.nn.Module,
    *,
    param_dtype: str = "fp32",
    grad_dtype: str | None = None,
    window: int = 10,
    density: float = 0.01,
    block_size: int = 4096,
    quant_block_size: int = 128,
    galore_rank: int = 128,
    gpu: str | int | Budget | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
) -> MemoryPlan:
    """Bytes of weights, gradients and optimizer state of training ``model`` with each optimizer.

    Args:
        model: anything :func:`load_model` reads (path, hub name, count, module) or a :class:`ModelSpec`.
        param_dtype: dtype of the weights: ``"fp32"`` (default; also mixed precision,
            whose weights and gradients stay fp32), ``"bf16"`` or ``"fp16"`` (pure 16-bit training).
        grad_dtype: dtype of the gradients (default: ``param_dtype``).
        window, density, block_size, quant_block_size: MicroAdam's hyperparameters (defaults as MicroAdam's).
        galore_rank: GaLore's rank r (default 128).
        gpu: a budget, a card name or size (see :func:`parse_budget`); sets ``fits``.
        batch_size, seq_len: give both for a rough activation estimate (see
            :func:`estimate_activations`), added to every total.

    Returns:
        A :class:`MemoryPlan`, every figure in bytes.

    Example:
        >>> from microadam.plan import plan_memory
        >>> plan = plan_memory("6.74B", gpu="A100-80GB")
        >>> round(plan.row("adamw").state / 1e9), round(plan.row("microadam").state / 1e9, 1)
        (54, 6.3)
    """
    settings = PlanSettings(
        param_dtype=param_dtype,
        grad_dtype=grad_dtype,
        window=window,
        density=density,
        block_size=block_size,
        quant_block_size=quant_block_size,
        galore_rank=galore_rank,
    )
    spec = load_model(model)
    if spec.num_params == 0:
        raise ValueError(f"model {spec.source!r} has no trainable floating-point tensors")
    budget = parse_budget(gpu) if gpu is not None else None
    if (batch_size is None) != (seq_len is None):
        given, missing = ("batch_size", "seq_len") if seq_len is None else ("seq_len", "batch_size")
        raise ValueError(f"{given} was given without {missing}; the activation estimate needs both")
    acts = estimate_activations(spec, batch_size, seq_len) if batch_size is not None and seq_len is not None else None
    return _plan(spec, settings, budget, acts)


def _plan(
    spec: ModelSpec, settings: PlanSettings, budget: Budget | None, acts: ActivationEstimate | None
) -> MemoryPlan:
    n = spec.num_params
    weights, grads = n * settings.param_bytes, n * settings.grad_bytes
    act = acts.bytes if acts else 0
    rows = []
    for o in OPTIMIZERS:
        state = o.state_bytes(spec.tensors, settings)
        total = weights + grads + state + act
        rows.append(
            OptimizerMemory(
                key=o.key,
                label=_label(o, settings),
                weights=weights,
                gradients=grads,
                state=state,
                activations=act,
                total=total,
                state_per_param=state / n,
                fits=None if budget is None else total <= budget.bytes,
            )
        )
    return MemoryPlan(spec, settings, budget, acts, tuple(rows), spec.notes)


@dataclass(frozen=True)
class ModelFit:
    """The largest model (parameters, as large tensors) that fits a budget with one optimizer."""

    key: str
    label: str
    max_params: int
    bytes_per_param: float
    total: int


def largest_model(
    gpu: str | int | Budget,
    *,
    param_dtype: str = "fp32",
    grad_dtype: str | None = None,
    window: int = 10,
    density: float = 0.01,
    block_size: int = 4096,
    quant_block_size: int = 128,
    galore_rank: int = 128,
) -> tuple[ModelFit, ...]:
    """The largest parameter count whose weights, gradients and optimizer state fit ``gpu``, per optimizer.

    The model is a bare count, modelled as large tensors (see
    :meth:`ModelSpec.from_count`); activations are not counted. The answer is
    the largest N with ``plan_memory(N).row(key).total <= budget``, found by
    bisection over the same formulas :func:`plan_memory` uses.

    Returns:
        One :class:`ModelFit` per optimizer, in the order of :data:`OPTIMIZERS`.
    """
    budget = parse_budget(gpu)
    settings = PlanSettings(
        param_dtype=param_dtype,
        grad_dtype=grad_dtype,
        window=window,
        density=density,
        block_size=block_size,
        quant_block_size=quant_block_size,
        galore_rank=galore_rank,
    )
    per_param_io = settings.param_bytes + settings.grad_bytes

    def total(o: _Optimizer, n: int) -> int:
        tensors = ModelSpec.from_count(n).tensors
        return n * per_param_io + o.state_bytes(tensors, settings)

    fits = []
    for o in OPTIMIZERS:
        lo, hi = 0, max(1, budget.bytes // per_param_io) + 1  # hi never fits: state >= 0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if total(o, mid) <= budget.bytes:
                lo = mid
            else:
                hi = mid
        used = total(o, lo) if lo else 0
        fits.append(ModelFit(o.key, _label(o, settings), lo, used / lo if lo else math.inf, used))
    return tuple(fits)


# --------------------------------------------------------------------------- text


def _size(n: float) -> str:
    """Bytes as GiB with one decimal (MiB below 1 GiB)."""
    if n >= GiB or n == 0:
        return f"{n / GiB:.1f} GiB"
    return f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    for div, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "k")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


def format_plan(plan: MemoryPlan) -> str:
    """The table ``microadam plan`` prints for ``plan``."""
    m, s = plan.model, plan.settings
    grad = s.grad_dtype or s.param_dtype
    lines = [
        f"Model: {m.source} ({m.kind}): {m.num_params:,} parameters in {m.num_tensors:,} tensors; "
        f"weights {s.param_dtype}, gradients {grad}.",
    ]
    stored = sorted({t.dtype for t in m.tensors if t.dtype})
    if m.kind == "safetensors" and stored:
        lines.append(f"Stored as {', '.join(stored)}; planned with {s.param_dtype} weights (--param-dtype).")
    if plan.budget:
        lines.append(f"Budget: {plan.budget.name}, {_size(plan.budget.bytes)}.")
    lines.append("")
    header = ["optimizer", "weights", "gradients", "optimizer state"]
    if plan.activations:
        header.append("activations (estimate)")
    header += ["total", "state bytes/param"]
    if plan.budget:
        header.append(f"fits {plan.budget.name}")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---|" + "---:|" * (len(header) - 1))
    for r in plan.rows:
        cells = [r.label, _size(r.weights), _size(r.gradients), _size(r.state)]
        if plan.activations:
            cells.append(_size(r.activations))
        cells += [_size(r.total), f"{r.state_per_param:.3f}"]
        if plan.budget:
            spare = plan.budget.bytes - r.total
            cells.append(f"yes ({_size(spare)} spare)" if r.fits else f"no ({_size(-spare)} over)")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("GiB = 2**30 bytes. Optimizer state as each library allocates it (checked against the real")
    lines.append("optimizers by tests/test_plan.py); fp32 unless the row says otherwise:")
    for o in OPTIMIZERS:
        lines.append(f"- {_label(o, s)}: {o.what}")
    if plan.activations:
        lines.append(f"Activations (estimate): {plan.activations.formula}.")
    else:
        lines.append("Activations are not counted: pass --batch-size and --seq-len for a rough estimate.")
    lines.append("Not counted: the CUDA context (~0.5-1 GiB), step temporaries, allocator fragmentation.")
    for note in plan.notes:
        lines.append(f"Note: {note}.")
    return "\n".join(lines)


def format_largest(fits: Sequence[ModelFit], budget: Budget, settings: PlanSettings | None = None) -> str:
    """The table ``microadam plan --max-model`` prints."""
    s = settings or PlanSettings()
    lines = [
        f"Largest model that fits {budget.name} ({_size(budget.bytes)}): weights {s.param_dtype}, "
        f"gradients {s.grad_dtype or s.param_dtype}, optimizer state; activations not counted.",
        f"Parameters as large tensors ({COUNT_MATRIX_DIM}x{COUNT_MATRIX_DIM} matrices).",
        "",
        "| optimizer | bytes/param (weights+grads+state) | largest model | total |",
        "|---|---:|---:|---:|",
    ]
    for f in fits:
        lines.append(f"| {f.label} | {f.bytes_per_param:.3f} | {_count(f.max_params)} | {_size(f.total)} |")
    lines.append("")
    lines.append("Not counted: activations, the CUDA context (~0.5-1 GiB), step temporaries, fragmentation.")
    return "\n".join(lines)
