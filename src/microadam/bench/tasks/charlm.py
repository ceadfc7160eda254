"""Train a small character-level transformer language model from scratch on the King James Bible.

The paper's language-model pre-training setting, scaled down to run on a CPU
(no pretrained GPT-style model is installable here). Data: the whole text
printed by ``bible "gen1:1-rev22:21"`` from the Debian package ``bible-kjv``
(4.3M characters, 75 distinct), run once and cached in
``$MICROADAM_CACHE/kjv.txt`` (default ``~/.cache/microadam/kjv.txt``);
``text_file=`` takes any UTF-8 text instead. Vocabulary: the sorted set of the
whole text's characters. Split: the last 5% of the characters are held out;
training batches are random windows of ``context + 1`` characters from the rest
(``train_examples`` keeps only its first that many characters). Evaluation:
``eval_examples`` (default 256) windows at fixed, evenly spaced positions of the
held-out text. Seeds change the initialisation and the windows drawn, not the
split. Model: token and learned positional embeddings, 4 pre-norm transformer
layers (d_model 128, 4 heads, feed-forward 512, no dropout) with a causal
mask, a final LayerNorm and an untied output layer: 0.82M parameters.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import numpy as np
import torch

from microadam.bench.tasks.base import MissingDependency, Task, TaskSize, Workload

__all__ = ["CharLMTask", "CharTransformer", "encode_text", "kjv_text"]

INSTALL = "apt-get install bible-kjv"
VERSES = "gen1:1-rev22:21"
HELD_OUT = 0.05
EVAL_WINDOWS = 256
EVAL_CHUNK = 64


def cache_dir() -> str:
    """Where downloaded or generated task data is kept: ``$MICROADAM_CACHE`` or ``~/.cache/microadam``."""
    return os.environ.get("MICROADAM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "microadam")


def _kjv_cache() -> str:
    return os.path.join(cache_dir(), "kjv.txt")


def _bible_missing(command: str) -> MissingDependency:
    return MissingDependency(
        f"the charlm task needs the King James Bible text: bible_command={command!r} was not found "
        f"and {_kjv_cache()} is not cached yet. Install it with `{INSTALL}`, or pass text_file= a text file"
    )


def kjv_text(command: str = "bible") -> str:
    """The whole King James Bible as printed by ``bible``, generated once and then read from the cache."""
    path = _kjv_cache()
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    exe = shutil.which(command)
    if exe is None:
        raise _bible_missing(command)
    # `bible` wraps lines at $COLUMNS; pin its default, 80, so the corpus is the same in every terminal.
    env = dict(os.environ, COLUMNS="80")
    proc = subprocess.run([exe, VERSES], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0 or len(proc.stdout) < 1_000_000:
        raise MissingDependency(
            f"`{command} {VERSES}` failed (exit {proc.returncode}, {len(proc.stdout)} characters): "
            f"{proc.stderr.strip()[:300]}. Reinstall it with `{INSTALL}`, or pass text_file= a text file"
        )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Written to a temporary file and renamed, so concurrent runs never read a half-written cache.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(proc.stdout)
    os.replace(tmp, path)
    return proc.stdout


def encode_text(text: str) -> tuple[str, torch.Tensor]:
    """(vocabulary, ids): the sorted set of ``text``'s characters and ``text`` as int64 indices into it."""
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    # np.unique sorts by code point, which is Python's order of one-character strings.
    uniq, ids = np.unique(codepoints, return_inverse=True)
    return "".join(map(chr, uniq.tolist())), torch.from_numpy(ids.astype(np.int64).reshape(-1))


@functools.lru_cache(maxsize=2)
def _load(text_file: str | None, command: str) -> tuple[str, torch.Tensor]:
    if text_file is None:
        return encode_text(kjv_text(command))
    with open(text_file, encoding="utf-8") as f:
        return encode_text(f.read())


class CharTransformer(torch.nn.Module):
    """A decoder-only transformer over characters: ``forward(ids (B, T)) -> logits (B, T, vocab)``."""

    def __init__(self, vocab: int, context: int, d_model: int, n_layers: int, n_heads: int) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d_model)
        self.pos = torch.nn.Embedding(context, d_model)
        layer = torch.nn.TransformerEncoderLayer(
            d_model, n_heads, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        # Nested tensors only help padded batches; with norm_first torch warns that it cannot use them.
        self.blocks = torch.nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(d_model)
        self.head = torch.nn.Linear(d_model, vocab)
        self.register_buffer("causal", torch.nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        x = self.blocks(x, mask=self.causal[:t, :t], is_causal=True)
        return self.head(self.norm(x))


class CharLMTask(Task):
    name = "charlm"
    metric = "val_loss"
    higher_is_better = False
    description = "4-layer character transformer (0.82M params) on the King James Bible from scratch (last 5% held out)"
    # Starting points, not tuned: AdamW's usual 1e-3 for a small transformer; MicroAdam a guess 3x higher.
    default_lr = {"microadam": 3e-3, "adamw": 1e-3, "lion": 1e-4, "*": 1e-3}

    def __init__(
        self,
        text_file: str | None = None,
        bible_command: str = "bible",
        context: int = 128,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
    ) -> None:
        for arg, value in (("context", context), ("d_model", d_model), ("n_layers", n_layers), ("n_heads", n_heads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be a positive integer, got {value!r}")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.text_file = None if text_file is None else str(text_file)
        self.bible_command = bible_command
        self.context = context
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads

    def check(self) -> None:
        if self.text_file is not None:
            if not os.path.isfile(self.text_file):
                raise ValueError(f"text_file={self.text_file!r} does not exist")
        elif not os.path.exists(_kjv_cache()) and shutil.which(self.bible_command) is None:
            raise _bible_missing(self.bible_command)

    def build(self, *, seed: int, size: TaskSize, device: torch.device) -> Workload:
        self.check()
        vocab, ids = _load(self.text_file, self.bible_command)
        split = int(len(ids) * (1 - HELD_OUT))
        train, held = ids[:split], ids[split:]
        if size.train_examples:
            train = train[: size.train_examples]
        span = self.context + 1
        for what, part, fix in (("training", train, "raise train_examples"), ("held-out", held, "use a longer text")):
            if len(part) < span:
                raise ValueError(f"the {what} text has {len(part)} characters, fewer than context + 1 = {span}; {fix}")
        n_eval = size.eval_examples or EVAL_WINDOWS
        starts = torch.linspace(0, len(held) - span, n_eval).long()
        held_windows = torch.stack([held[s : s + span] for s in starts.tolist()]).to(device)
        train = train.to(device)
        offsets = torch.arange(span, device=device)

        torch.manual_seed(seed)
        model = CharTransformer(len(vocab), self.context, self.d_model, self.n_layers, self.n_heads).to(device)
        gen = torch.Generator().manual_seed(seed)

        def windows() -> Iterator[torch.Tensor]:
            # Random windows with replacement: there are no epochs to repeat.
            while True:
                s = torch.randint(0, len(train) - span + 1, (size.batch_size,), generator=gen).to(device)
                yield train[s[:, None] + offsets]

        def loss(m: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
            logits = m(batch[:, :-1])
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

        @torch.no_grad()
        def evaluate(m: torch.nn.Module) -> dict[str, float]:
            was_training = m.training
            m.eval()
            loss_sum, correct = 0.0, 0
            for i in range(0, len(held_windows), EVAL_CHUNK):
                w = held_windows[i : i + EVAL_CHUNK]
                logits, y = m(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten()
                loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
                correct += (logits.argmax(-1) == y).sum().item()
            m.train(was_training)
            n = held_windows.shape[0] * self.context
            val_loss = loss_sum / n
            return {"val_loss": val_loss, "perplexity": math.exp(val_loss), "accuracy": correct / n}

        model.train()
        return Workload(
            model,
            windows(),
            loss,
            evaluate,
            info={
                "model": f"char transformer {self.n_layers}x{self.d_model}, {self.n_heads} heads, ctx {self.context}",
                "data": self.text_file or "King James Bible (bible-kjv)",
                "vocab": len(vocab),
                "train_examples": len(train),
                "eval_examples": int(held_windows.shape[0]),
            },
        )
