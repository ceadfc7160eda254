"""``microadam plan``: the planner's figures against the real optimizers, and its readers.

The state formulas in ``microadam.plan`` are claims about other libraries; each is
checked here against ``microadam.state_bytes`` of the real optimizer after one
step on a small transformer-shaped model. Third-party optimizers are skipped when
not installed; torch's AdamW and Adafactor and MicroAdam always run.
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
from collections import Counter
from contextlib import nullcontext

import pytest
import torch
from torch import nn

from microadam import MicroAdam, state_bytes
from microadam.cli import main
from microadam.layout import layout_for
from microadam.plan import (
    GPUS,
    ModelSpec,
    PlanSettings,
    format_largest,
    format_plan,
    largest_model,
    load_model,
    parse_budget,
    parse_param_count,
    plan_memory,
)

try:  # transformers is not a dependency; with it, hand counts are checked against real models
    import transformers
except ImportError:
    transformers = None

# The planner's state figures must agree with the measured ones within this
# fraction (the bar); all but Adam-mini's v are exact by construction.
STATE_REL_TOL = 0.01


def assert_close(planned: float, measured: float, rel: float = STATE_REL_TOL) -> None:
    assert math.isclose(planned, measured, rel_tol=rel), f"planned {planned:,} vs measured {measured:,}"


# --------------------------------------------------------------------------- a small model

HIDDEN, HEADS = 64, 4


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, name, nn.Linear(HIDDEN, HIDDEN, bias=False))
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(HIDDEN, 4 * HIDDEN)
        self.mlp.down_proj = nn.Linear(4 * HIDDEN, HIDDEN)
        self.input_layernorm = nn.LayerNorm(HIDDEN)


class TinyLM(nn.Module):
    """Embedding, attention and MLP linears, layer norms, biases; an lm_head of 64x90 = 5760
    elements (a multiple of 128 but not of 256) and tensors under 4096 elements, so the
    8-bit and 4-bit thresholds are both exercised."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(512, HIDDEN)
        self.layers = nn.ModuleList(Block() for _ in range(2))
        self.norm = nn.LayerNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, 90)


def _galore(params, rank):
    from galore_torch import GaLoreAdamW

    params = list(params)
    matrices = [p for p in params if p.ndim == 2]
    rest = [p for p in params if p.ndim != 2]
    groups = [
        {"params": rest},
        {"params": matrices, "rank": rank, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"},
    ]
    return GaLoreAdamW(groups, lr=1e-3, no_deprecation_warning=True)


def _adam_mini(model):
    from adam_mini import Adam_mini

    return Adam_mini(model.named_parameters(), lr=1e-3, dim=HIDDEN, n_heads=HEADS, verbose=False)


def _torchao(name):
    import torchao.optim

    return lambda params: getattr(torchao.optim, name)(params, lr=1e-3)


def _bnb(name, **kwargs):
    import bitsandbytes as bnb

    return lambda params: getattr(bnb.optim, name)(params, lr=1e-3, **kwargs)


# (planner key, module to import or None for torch/microadam, make(model) -> optimizer, plan settings, param dtype)
PEERS = [
    ("adamw", None, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), {}, torch.float32),
    ("adamw-bf16", None, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), {}, torch.bfloat16),
    ("adafactor", None, lambda m: torch.optim.Adafactor(m.parameters(), lr=1e-3), {}, torch.float32),
    ("microadam", None, lambda m: MicroAdam(m.parameters(), lr=1e-3), {}, torch.float32),
    (
        "microadam",
        None,
        lambda m: MicroAdam(m.parameters(), lr=1e-3, window=5, density=0.05, block_size=1024, quant_block_size=64),
        dict(window=5, density=0.05, block_size=1024, quant_block_size=64),
        torch.float32,
    ),
    ("adamw8bit-bnb", "bitsandbytes", lambda m: _bnb("AdamW8bit")(m.parameters()), {}, torch.float32),
    ("lion", "bitsandbytes", lambda m: _bnb("Lion", optim_bits=32)(m.parameters()), {}, torch.float32),
    ("adamw8bit-torchao", "torchao", lambda m: _torchao("AdamW8bit")(m.parameters()), {}, torch.float32),
    ("adamw4bit-torchao", "torchao", lambda m: _torchao("AdamW4bit")(m.parameters()), {}, torch.float32),
    ("galore", "galore_torch", lambda m: _galore(m.parameters(), rank=8), dict(galore_rank=8), torch.float32),
    ("adam-mini", "adam_mini", _adam_mini, {}, torch.float32),
    # These three keep their state in the gradients' (the weights') dtype: with bf16 weights it halves.
    ("adafactor", None, lambda m: torch.optim.Adafactor(m.parameters(), lr=1e-3), {}, torch.bfloat16),
    ("galore", "galore_torch", lambda m: _galore(m.parameters(), rank=8), dict(galore_rank=8), torch.bfloat16),
    ("adam-mini", "adam_mini", _adam_mini, {}, torch.bfloat16),
]


@pytest.mark.parametrize(
    "key, module, make, settings, dtype",
    PEERS,
    ids=[f"{p[0]}-{i}" if p[3] else p[0] for i, p in enumerate(PEERS)],
)
def test_state_matches_the_real_optimizer(key, module, make, settings, dtype):
    if module is not None:
        pytest.importorskip(module)
    if key == "adafactor" and not hasattr(torch.optim, "Adafactor"):
        pytest.skip("torch.optim.Adafactor is new in torch 2.5")
    torch.manual_seed(0)
    model = TinyLM().to(dtype)
    opt = make(model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    # torchao compiles its step; eager keeps this test fast on CPU and allocates the same state.
    with torch.compiler.set_stance("force_eager") if module == "torchao" else nullcontext():
        opt.step()
    measured = state_bytes(opt)
    planned = plan_memory(model, param_dtype="bf16" if dtype == torch.bfloat16 else "fp32", **settings).row(key)
    assert_close(planned.state, measured)
    if key != "adam-mini":  # Adam-mini's v is an upper bound (one per row where it keeps one per head)
        assert planned.state == measured


def test_weights_and_gradients_follow_the_dtypes():
    model = TinyLM()
    n = sum(p.numel() for p in model.parameters())
    plan = plan_memory(model, param_dtype="fp16", grad_dtype="fp32")
    for row in plan.rows:
        assert (row.weights, row.gradients) == (2 * n, 4 * n)
        assert row.total == row.weights + row.gradients + row.state
        assert row.fits is None


# --------------------------------------------------------------------------- config.json

LLAMA = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    hidden_size=64,
    intermediate_size=172,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
    tie_word_embeddings=False,
)
BERT = dict(
    model_type="bert",
    architectures=["BertForMaskedLM"],
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=1000,
    max_position_embeddings=128,
    type_vocab_size=2,
)


def llama_by_hand(c):
    h, i, L, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return v * h * (1 if c["tie_word_embeddings"] else 2) + L * layer + h


def bert_mlm_by_hand(c):
    h, i, L, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    embeddings = (v + c["max_position_embeddings"] + c["type_vocab_size"]) * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
    head = h * h + h + 2 * h + v  # transform dense, LayerNorm, decoder bias (decoder weight tied)
    return embeddings + L * layer + head


def _transformers_shapes(config: dict) -> Counter:
    cfg = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = getattr(transformers, config["architectures"][0])(cfg)
    return Counter(tuple(p.shape) for p in model.parameters())


def _shapes(spec: ModelSpec) -> Counter:
    shapes: Counter = Counter()
    for t in spec.tensors:
        shapes[t.shape] += t.count
    return shapes


def _write_config(tmp_path, config, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("config, by_hand", [(LLAMA, llama_by_hand), (BERT, bert_mlm_by_hand)], ids=["llama", "bert"])
def test_config_json_counts(tmp_path, config, by_hand):
    spec = load_model(str(_write_config(tmp_path, config)))
    assert spec.kind == "config"
    assert spec.num_params == by_hand(config)
    assert load_model(tmp_path).num_params == spec.num_params  # a folder holding config.json
    if transformers is not None:
        assert _shapes(spec) == _transformers_shapes(config)


# Hand-counted families against transformers' own models, shape by shape.
FAMILIES = [
    LLAMA,
    dict(LLAMA, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    dict(LLAMA, architectures=["LlamaModel"]),
    dict(LLAMA, model_type="mistral", architectures=["MistralForCausalLM"], head_dim=32),
    dict(LLAMA, model_type="qwen2", architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True),
    dict(LLAMA, model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=24),
    # Without num_key_value_heads: transformers' defaults are 8 (Mistral) and 32 (Qwen), not the heads'
    # number (audit of session 19: counted as Llama's, Qwen3 was a third of its size).
    *(
        {k: v for k, v in dict(LLAMA, model_type=mt, architectures=[arch]).items() if k != "num_key_value_heads"}
        for mt, arch in (("mistral", "MistralForCausalLM"), ("qwen2", "Qwen2Model"), ("qwen3", "Qwen3ForCausalLM"))
    ),
    dict(
        model_type="gpt2",
        architectures=["GPT2LMHeadModel"],
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=128,
        vocab_size=1000,
    ),
    dict(BERT, architectures=["BertModel"]),
    dict(BERT, architectures=["BertForSequenceClassification"], id2label={"0": "a", "1": "b", "2": "c"}),
    dict(BERT, tie_word_embeddings=False),  # untied: its own decoder weight and (transformers 5) decoder bias
]


@pytest.mark.skipif(transformers is None, reason="transformers is not installed: nothing to compare the counts with")
@pytest.mark.parametrize("config", FAMILIES, ids=lambda c: f"{c['model_type']}-{c['architectures'][0]}")
def test_hand_counts_match_transformers(tmp_path, config):
    assert _shapes(load_model(str(_write_config(tmp_path, config)))) == _transformers_shapes(config)


def test_unknown_architecture_is_built_on_the_meta_device(tmp_path, monkeypatch):
    config = dict(
        model_type="gpt_neox",
        architectures=["GPTNeoXForCausalLM"],
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=1000,
    )
    path = str(_write_config(tmp_path, config))
    if transformers is not None:
        spec = load_model(path)
        assert _shapes(spec) == _transformers_shapes(config)
        assert any("meta device" in n for n in spec.notes)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(ImportError, match=r"gpt_neox.*pip install transformers"):
        load_model(path)


MIXTRAL = dict(
    model_type="mixtral",
    architectures=["MixtralForCausalLM"],
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
    max_position_embeddings=256,
    num_local_experts=4,
    tie_word_embeddings=False,
)


@pytest.mark.skipif(transformers is None, reason="transformers is not installed: these configs are counted with it")
@pytest.mark.parametrize("left_out", [(), ("vocab_size",), ("vocab_size", "num_local_experts")])
def test_fields_transformers_filled_in_are_named(tmp_path, left_out):
    """A config counted through transformers takes its defaults for missing fields: the plan says which."""
    config = {k: v for k, v in MIXTRAL.items() if k not in left_out}
    spec = load_model(str(_write_config(tmp_path, config)))
    notes = [n for n in spec.notes if "transformers' defaults" in n]
    if not left_out:
        assert notes == []
        return
    built = transformers.AutoConfig.for_model(**config)
    assert notes == [
        "fields the config does not give were taken from transformers' defaults: "
        + ", ".join(f"{k}={getattr(built, k)!r}" for k in left_out)
        + "; add them to the config if the model differs"
    ]
    assert notes[0] in format_plan(plan_memory(spec))


@pytest.mark.skipif(transformers is None, reason="transformers is not installed: it decides which types exist")
@pytest.mark.parametrize("model_type, close", [("lama", "llama"), ("no-such-model-xyz", "no close match")])
def test_unknown_model_type_error_is_short_and_suggests(tmp_path, model_type, close):
    path = _write_config(tmp_path, dict(LLAMA, model_type=model_type, architectures=["X"]))
    with pytest.raises(ValueError) as info:
        load_model(str(path))
    message = str(info.value)
    # transformers' own message lists all 800+ types (about 10,000 characters).
    assert len(message) < 400 and close in message and "CONFIG_MAPPING" in message, message


# (a field, a bad value): each divides or sizes a tensor, so it must be a positive int.
BAD_SIZES = [
    ("num_attention_heads", 0),
    ("num_attention_heads", -4),
    ("hidden_size", 0),
    ("num_key_value_heads", 0),
    ("head_dim", -1),
    ("vocab_size", 0),
    ("intermediate_size", 1.5),
]


@pytest.mark.parametrize("key, value", BAD_SIZES, ids=[f"{k}={v}" for k, v in BAD_SIZES])
def test_non_positive_sizes_name_the_field(tmp_path, key, value):
    for config in (LLAMA, MIXTRAL):  # counted by hand; through transformers
        path = _write_config(tmp_path, dict(config, **{key: value}))
        with pytest.raises(ValueError, match=rf"{key} must be a positive int, got {value!r}"):
            load_model(str(path))


def test_hub_name_loads_with_autoconfig_and_fails_clearly_offline(monkeypatch):
    if transformers is None:
        with pytest.raises(ImportError, match="pip install transformers"):
            load_model("meta-llama/Llama-2-7b-hf")
        return

    def offline(name, *args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(ValueError, match=r"'meta-llama/Llama-2-7b-hf'.*OSError.*config\.json"):
        load_model("meta-llama/Llama-2-7b-hf")
    online = transformers.AutoConfig.for_model(**LLAMA)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda name, *a, **k: online)
    assert load_model("org/tiny-llama").num_params == llama_by_hand(LLAMA)


# --------------------------------------------------------------------------- safetensors


def write_safetensors(path, tensors: dict[str, tuple[str, list[int]]], metadata=None):
    """A safetensors file written by hand: 8-byte LE header length, JSON header, zero bytes."""
    sizes = {"F32": 4, "BF16": 2, "F16": 2, "I64": 8}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        nbytes = math.prod(shape) * sizes[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    return path


def test_safetensors_header_is_read_without_the_library(tmp_path):
    path = write_safetensors(
        tmp_path / "model.safetensors",
        {
            "embed.weight": ("BF16", [100, 64]),
            "layers.0.proj.weight": ("BF16", [64, 64]),
            "layers.1.proj.weight": ("BF16", [64, 64]),
            "layers.0.proj.bias": ("F32", [64]),
            "position_ids": ("I64", [1, 128]),
        },
        metadata={"format": "pt"},
    )
    spec = load_model(str(path))
    assert spec.kind == "safetensors"
    assert spec.num_params == 100 * 64 + 2 * 64 * 64 + 64
    assert {(t.name, t.shape, t.count, t.dtype) for t in spec.tensors} == {
        ("embed.weight", (100, 64), 1, "BF16"),
        ("layers.*.proj.weight", (64, 64), 2, "BF16"),
        ("layers.*.proj.bias", (64,), 1, "F32"),
    }
    assert any("integer" in n for n in spec.notes)
    try:  # the real reader, when installed, sees the same file
        from safetensors import safe_open
    except ImportError:
        return
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == sorted(
            ["embed.weight", "layers.0.proj.weight", "layers.1.proj.weight", "layers.0.proj.bias", "position_ids"]
        )


def test_safetensors_folder_with_shards_and_config(tmp_path):
    write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {"a.weight": ("BF16", [64, 64])})
    write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {"b.weight": ("BF16", [32, 64])})
    _write_config(tmp_path, LLAMA)
    spec = load_model(tmp_path)
    assert (spec.kind, spec.num_params, spec.hidden_size, spec.num_layers) == ("safetensors", 96 * 64, 64, 3)
    assert "Stored as BF16" in format_plan(plan_memory(spec))


def _index(folder, weight_map):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_safetensors_index_decides_which_files_count(tmp_path):
    """A consolidated copy beside indexed shards is not counted twice; the index file can be passed too."""
    write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {"a.weight": ("BF16", [64, 64])})
    write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {"b.weight": ("BF16", [32, 64])})
    write_safetensors(
        tmp_path / "consolidated.safetensors", {"a.weight": ("BF16", [64, 64]), "b.weight": ("BF16", [32, 64])}
    )
    _index(tmp_path, {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"})
    folder = load_model(tmp_path)
    assert folder.num_params == 96 * 64 and any("named by model.safetensors.index.json" in n for n in folder.notes)
    assert load_model(str(tmp_path / "model.safetensors.index.json")).num_params == 96 * 64
    _index(tmp_path, {})  # names no shard: every file is read, as without an index
    assert load_model(tmp_path).num_params == 2 * 96 * 64
    with pytest.raises(ValueError, match="empty weight_map.*pass the folder"):
        load_model(str(tmp_path / "model.safetensors.index.json"))
    _index(tmp_path, {"a.weight": "model-00001-of-00009.safetensors"})
    with pytest.raises(ValueError, match=r"not beside it: \['model-00001-of-00009.safetensors'\]"):
        load_model(tmp_path)


def test_corrupt_safetensors_is_a_value_error(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(ValueError, match="bad.safetensors.*header length"):
        load_model(str(path))
    path.write_bytes(struct.pack("<Q", 4) + b"nope")
    with pytest.raises(ValueError, match="not JSON"):
        load_model(str(path))


# --------------------------------------------------------------------------- counts


@pytest.mark.parametrize(
    "text, value",
    [
        ("7e9", 7_000_000_000),
        ("125M", 125_000_000),
        ("1.3B", 1_300_000_000),
        ("6.74b", 6_740_000_000),
        ("350k", 350_000),
        ("1_000_000", 1_000_000),
        (" 2T ", 2 * 10**12),
        (7e9, 7_000_000_000),
        (4096, 4096),
    ],
)
def test_parameter_counts(text, value):
    assert parse_param_count(text) == value
    assert load_model(text).num_params == value


@pytest.mark.parametrize("text", ["-7e9", "0", "-1M", 0, -5])
def test_non_positive_count_is_a_value_error_naming_it(text):
    with pytest.raises(ValueError, match=r"parameter count.*" + str(text).replace("+", r"\+") + r".*> 0"):
        plan_memory(text)


def test_a_count_too_large_for_a_float_says_so():
    with pytest.raises(ValueError, match=r"'1e400'; it is too large"):
        parse_param_count("1e400")


def test_a_count_that_is_also_a_folder_here_is_read_as_a_count_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "125m").mkdir()
    with pytest.warns(UserWarning, match=r"'125m' is read as a parameter count.*pass ./125m"):
        assert load_model("125m").num_params == 125 * 10**6


def test_count_must_be_whole():
    with pytest.raises(ValueError, match="whole number"):
        parse_param_count("1.5")


def test_counts_are_exact_and_odd_ones_are_named():
    """Found by the audit of session 19: counts went through a float (9007199254740993 printed as
    ...992), 7e-9 said "num_params: 0", and NaN said "too large"."""
    assert parse_param_count("9007199254740993") == 9007199254740993
    assert parse_param_count("1e30") == 10**30
    with pytest.raises(ValueError, match=r"'7e-9'; it is less than one parameter"):
        parse_param_count("7e-9")
    with pytest.raises(ValueError, match=r"nan; it is not a number"):
        parse_param_count(float("nan"))
    with pytest.raises(ValueError, match=r"the model is an empty string.*'\.' for the current folder"):
        load_model("")  # an unset shell variable: it planned the current folder


def test_bare_count_is_large_tensors_of_the_same_total():
    spec = ModelSpec.from_count(7 * 10**9 + 12345)
    assert spec.num_params == 7 * 10**9 + 12345
    assert max(t.numel for t in spec.tensors) == 4096 * 4096


# --------------------------------------------------------------------------- LLaMA-2 7B

LLAMA2_7B = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    tie_word_embeddings=False,
)


def test_llama2_7b(tmp_path):
    plan = plan_memory(str(_write_config(tmp_path, LLAMA2_7B)), gpu="A100-80GB")
    n = plan.model.num_params
    assert n == 6_738_415_616 == llama_by_hand(LLAMA2_7B)
    adamw, micro = plan.row("adamw"), plan.row("microadam")
    assert adamw.state == 8 * n + 4 * plan.model.num_tensors  # m, v and a step tensor each
    assert 53e9 < adamw.state < 55e9  # "about 54 GB"
    expected = sum(
        t.count * layout_for(t.numel, block_size=4096, density=0.01, quant_block_size=128, window=10).state_bytes
        for t in plan.model.tensors
    )
    assert micro.state == expected
    assert 6.0e9 < micro.state < 6.6e9  # "about 6 GB": 0.93 bytes/param
    # A bare count of the same size gives the same answer within 1% for every optimizer
    # whose state does not depend on matrix sides.
    count = plan_memory(n, gpu="A100-80GB")
    for row in plan.rows:
        if row.key not in ("galore", "adafactor"):
            assert_close(count.row(row.key).total, row.total)


def test_activation_estimate_prints_its_formula(tmp_path):
    plan = plan_memory(str(_write_config(tmp_path, LLAMA2_7B)), batch_size=2, seq_len=1024)
    assert plan.activations.bytes == 34 * 32 * 2 * 1024 * 4096 + 4 * 2 * 1024 * 32000
    row = plan.row("microadam")
    assert row.total == row.weights + row.gradients + row.state + plan.activations.bytes
    text = format_plan(plan)
    assert "34*L*b*s*h" in text and "Korthikanti" in text and "approximation" in text
    with pytest.raises(ValueError, match="hidden_size"):
        plan_memory("7e9", batch_size=2, seq_len=1024)
    with pytest.raises(ValueError, match="batch_size was given without seq_len"):
        plan_memory("7e9", batch_size=2)


# --------------------------------------------------------------------------- budgets


def test_budgets():
    assert parse_budget("A100-80GB").bytes == 80 * 2**30
    assert parse_budget("h200").name == "H200-141GB"
    assert parse_budget("24GB").bytes == 24 * 10**9
    assert parse_budget("24GiB").bytes == 24 * 2**30
    plan = plan_memory("7e9", gpu="A100-80GB")  # fp32 weights and gradients: 56 GB before the state
    assert [r.key for r in plan.rows if not r.fits] == ["adamw"]  # 16 bytes/param: 112 GB
    plan = plan_memory("7e9", gpu="A100-80GB", param_dtype="bf16")
    assert all(r.fits for r in plan.rows)


def test_unknown_gpu_lists_the_known_ones():
    with pytest.raises(ValueError, match="Unknown gpu: 'B300'") as e:
        parse_budget("B300")
    assert all(name in str(e.value) for name in GPUS)
    with pytest.raises(ValueError, match="Ambiguous gpu: 'A100'.*A100-40GB.*A100-80GB"):
        parse_budget("A100")


def test_largest_model_is_the_boundary_of_plan_memory():
    fits = largest_model("H100-80GB")
    budget = parse_budget("H100-80GB").bytes
    by_key = {f.key: f for f in fits}
    assert by_key["microadam"].max_params > by_key["adamw8bit-bnb"].max_params > by_key["adamw"].max_params
    assert math.isclose(by_key["adamw"].max_params, budget / 16, rel_tol=1e-3)  # 4 + 4 + 8 bytes/param
    for key in ("adamw", "microadam", "galore"):
        n = by_key[key].max_params
        assert plan_memory(n, gpu=budget).row(key).fits
        assert not plan_memory(n + 1, gpu=budget).row(key).fits


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(param_dtype="fp8"), "param_dtype: 'fp8'"),
        (dict(density=0.0), "density: 0.0"),
        (dict(galore_rank=0), "galore_rank: 0"),
        (dict(block_size=4096, quant_block_size=100), "one must divide the other"),
        (dict(gpu="-3GB"), "Unknown gpu"),
    ],
)
def test_bad_settings_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_memory("1B", **kwargs)


def test_unreadable_config_paths(tmp_path):
    with pytest.raises(ValueError, match=r"'.*missing/config\.json'.*no such file"):
        load_model(str(tmp_path / "missing" / "config.json"))
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(str(bad))
    binary = tmp_path / "pytorch_model.bin"
    binary.write_bytes(b"\x80\x02\xff\xfe")
    with pytest.raises(ValueError, match="neither a config.json"):
        load_model(str(binary))
    bad.write_text(json.dumps(dict(LLAMA, hidden_size=None)))
    with pytest.raises(ValueError, match="no hidden_size"):
        load_model(str(bad))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="neither"):
        load_model(empty)
    with pytest.raises(TypeError, match="model must be"):
        load_model([1, 2])


# --------------------------------------------------------------------------- CLI


def test_cli_prints_what_the_api_returns(capsys):
    assert main(["plan", "7e9", "--gpu", "A100-80GB"]) == 0
    assert capsys.readouterr().out == format_plan(plan_memory("7e9", gpu="A100-80GB")) + "\n"
    args = ["--param-dtype", "fp32", "--window", "5", "--density", "0.02", "--galore-rank", "64"]
    assert main(["plan", "--gpu", "H100-80GB", "--max-model", *args]) == 0
    kw = dict(param_dtype="fp32", window=5, density=0.02, galore_rank=64)
    expected = format_largest(largest_model("H100-80GB", **kw), parse_budget("H100-80GB"), PlanSettings(**kw))
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize(
    "argv, match",
    [
        (["plan", "--", "-7e9"], "Invalid model parameter count: '-7e9'"),
        (["plan", "-5"], "parameter count: '-5'"),
        (["plan", "7e9", "--gpu", "TPUv5"], "Unknown gpu: 'TPUv5'.*H100-80GB"),
        (["plan", "--max-model"], "--max-model needs --gpu"),
        (["plan", "7e9", "--density", "2"], "density: 2.0"),
        (["plan", "--max-model", "--gpu", "24GB", "--batch-size", "8"], "--max-model.*--batch-size, --seq-len"),
        (["plan", "--max-model", "--gpu", "24GB", "--seq-len", "512"], "--max-model.*--batch-size, --seq-len"),
    ],
)
def test_cli_errors(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("microadam plan: error:")
    assert re.search(match, err), err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--lrs", "abc"], "--lrs: 'abc' in 'abc' is not a number"),
        (["--lrs", "1e-3,"], "--lrs: '' in '1e-3,' is not a number"),
        (["--lrs=-1e-3"], "--lrs: learning rates must be finite and > 0, got '-1e-3'"),
        (["--lrs", "1e-3,nan"], "--lrs: learning rates must be finite and > 0, got 'nan'"),
        (["--lrs", "inf"], "--lrs: learning rates must be finite and > 0, got 'inf'"),
        (["--epochs", "0"], "--epochs: expected a positive integer, got '0'"),
        (["--epochs", "-1"], "--epochs: expected a positive integer, got '-1'"),
        (["--epochs", "2.5"], "--epochs: expected a positive integer, got '2.5'"),
    ],
)
def test_demo_rejects_bad_arguments_before_training(capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        main(["demo", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"microadam demo: error: argument {match}"), err


def test_cli_stops_quietly_on_a_closed_pipe():
    """`microadam plan 7e9 | head -1`: the reader has gone; no BrokenPipeError traceback."""
    import os
    import subprocess

    read, write = os.pipe()
    os.close(read)  # closed before the first write: the failure is certain, not a race with `head`
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "microadam", "plan", "7e9"], stdout=write, stderr=subprocess.PIPE, timeout=120
        )
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr.decode() == "", proc.stderr.decode()


def test_cli_keeps_demo():
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0


def test_numpy_settings_are_taken_as_numbers_as_microadam_takes_them():
    np = pytest.importorskip("numpy")
    assert plan_memory("7e9", density=np.float64(0.02), window=np.int64(5)) == plan_memory(
        "7e9", density=0.02, window=5
    )
