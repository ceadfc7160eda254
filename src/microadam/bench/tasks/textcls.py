"""Fine-tune any Hugging Face model for text (or text-pair) classification on any labelled data.

The paper's BERT-on-GLUE setting with the model and data left to the user.
Model: ``model=`` (required), a Hugging Face hub name or a local folder, loaded
with ``AutoModelForSequenceClassification`` and a fresh head of ``num_labels``
outputs. Data, either:

* ``dataset=`` a hub dataset name (with ``dataset_config=``, e.g. ``glue`` /
  ``mnli``), read with the ``datasets`` library from ``train_split=`` (default
  ``"train"``) and ``eval_split=`` (default ``"validation"``); or
* ``train_file=`` a local CSV, JSON (a list of objects, or one object per line)
  or JSONL file, and optionally ``eval_file=``; without one, a fixed-seed 10%
  of the training file is held out.

Columns: ``text_column=`` (default ``"text"``), ``text_pair_column=`` for pairs
such as MNLI's premise / hypothesis, ``label_column=`` (default ``"label"``).
Labels may be integers (kept; ``num_labels`` is the largest plus one) or strings
(sorted and numbered); a missing label (an empty cell, null, NaN or "nan") is an error
naming the row. Both splits are shuffled once with seed 0 and a stage
takes the first ``train_examples`` and ``eval_examples`` (default: all), so
label-sorted sources still give mixed subsets. Seeds change the new head's
initialisation and the order of the batches, not the split. Batches are
tokenized as they are drawn, padded to their longest text (at most
``max_length`` tokens).
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from typing import Any

import torch

from microadam.bench.tasks.base import MissingDependency, Task, TaskSize, Workload, sequence_classification_workload

__all__ = ["TextClassificationTask", "read_records"]

HELD_OUT = 0.1
EVAL_BATCH = 64

Example = tuple[str, str | None, Any]  # (text, text pair or None, raw label)


def read_records(path: str) -> list[dict[str, Any]]:
    """The rows of a local ``.csv``, ``.json`` (a list of objects, or JSON lines) or ``.jsonl`` file, as dicts."""
    ext = os.path.splitext(path)[1].lower()
    # utf-8-sig: Excel and Windows tools write a byte-order mark, which plain utf-8 would keep as
    # part of the first column's name ('\ufefftext'); without a mark it reads as utf-8.
    if ext == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            return list(csv.DictReader(f))
    if ext not in (".json", ".jsonl"):
        raise ValueError(f"{path}: unsupported file type {ext!r}; give a .csv, .json or .jsonl file")
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    if ext == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError:
            rows = None  # not one document: read it as JSON lines, as the datasets library does
        if rows is not None:
            if not isinstance(rows, list):
                raise ValueError(f"{path}: expected a JSON list of objects or one object per line")
            return rows
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            whole = " (and the whole file is not one JSON document either)" if ext == ".json" else ""
            raise ValueError(
                f"{path}: line {number} is not valid JSON ({e.msg}, column {e.colno}){whole}; "
                "each line must be one JSON object"
            ) from e
    return rows


def _missing(value: Any, is_label: bool) -> bool:
    """A value that stands for no value: None (JSON null), and for labels an empty CSV cell or NaN.

    pandas writes a missing value as ``nan`` in CSV and as NaN in JSON; kept, it would become a
    class of its own named "nan", trained on and scored against.
    """
    if value is None:
        return True
    if not is_label:
        return False  # an empty text is still a text
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and value.strip().lower() in ("", "nan")


def _examples(rows: list[dict[str, Any]], source: str, text: str, pair: str | None, label: str) -> list[Example]:
    if not rows:
        raise ValueError(f"{source} has no rows")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ValueError(f"row {i} of {source} is a {type(r).__name__}, not an object with named columns")
    columns = (("text_column", text), ("text_pair_column", pair), ("label_column", label))
    for arg, column in columns:
        if column is not None and column not in rows[0]:
            raise ValueError(f"{arg}={column!r} is not a column of {source}; its columns are {sorted(rows[0])}")
    out = []
    for i, r in enumerate(rows):
        for arg, column in columns:
            if column is not None and _missing(r.get(column), column == label):
                raise ValueError(f"row {i} of {source} has no value in {arg}={column!r} (got {r.get(column)!r})")
        out.append((str(r[text]), None if pair is None else str(r[pair]), r[label]))
    return out


def _as_int(label: Any) -> int | None:
    if isinstance(label, bool):
        return None
    if isinstance(label, int):
        return label
    if isinstance(label, float) and label.is_integer():
        return int(label)
    # CSV has no types: "0"/"1" are integer labels, not the strings "0" and "1".
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        return int(label.strip())
    return None


def _label_map(labels: list[Any], label_column: str) -> tuple[dict[Any, int], list[str]]:
    """Raw label -> class index, and the class names (index order)."""
    ints = [_as_int(y) for y in labels]
    if all(v is not None for v in ints):
        if min(ints) < 0:
            raise ValueError(
                f"label_column={label_column!r} holds negative labels (e.g. an unlabelled test split); "
                "use a labelled split or file"
            )
        n = max(ints) + 1
        return {y: v for y, v in zip(labels, ints)}, [str(i) for i in range(n)]
    names = sorted({str(y) for y in labels})
    index = {name: i for i, name in enumerate(names)}
    return {y: index[str(y)] for y in labels}, names


class TextClassificationTask(Task):
    name = "text-classification"
    metric = "accuracy"
    higher_is_better = True
    description = "fine-tune any Hugging Face model on any text classification data (hub dataset or local files)"
    # As on tweets (a pretrained encoder fine-tuned): AdamW's usual 3e-5, MicroAdam's 1e-4. Starting points only.
    default_lr = {"microadam": 1e-4, "*": 3e-5}

    def __init__(
        self,
        model: str | None = None,
        *,
        dataset: str | None = None,
        dataset_config: str | None = None,
        train_split: str = "train",
        eval_split: str = "validation",
        train_file: str | None = None,
        eval_file: str | None = None,
        text_column: str = "text",
        text_pair_column: str | None = None,
        label_column: str = "label",
        max_length: int = 128,
    ) -> None:
        if not model:
            raise ValueError("the text-classification task needs model=, a Hugging Face model name or a local folder")
        if (dataset is None) == (train_file is None):
            raise ValueError(
                "the text-classification task needs exactly one of dataset= (a hub dataset name) "
                f"or train_file= (a local .csv/.json/.jsonl file); got dataset={dataset!r}, train_file={train_file!r}"
            )
        if eval_file is not None and train_file is None:
            raise ValueError("eval_file= needs train_file=; with dataset= use eval_split=")
        for arg, path in (("train_file", train_file), ("eval_file", eval_file)):
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{arg}={path!r} does not exist")
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
        self.model_name = str(model)
        self.dataset = dataset
        self.dataset_config = dataset_config
        self.train_split = train_split
        self.eval_split = eval_split
        self.train_file = None if train_file is None else str(train_file)
        self.eval_file = None if eval_file is None else str(eval_file)
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.label_column = label_column
        self.max_length = max_length

    def check(self) -> None:
        try:
            import transformers  # noqa: F401
        except ImportError as e:
            raise MissingDependency("the text-classification task needs transformers: pip install transformers") from e
        if self.dataset is not None:
            try:
                import datasets  # noqa: F401
            except ImportError as e:
                raise MissingDependency(
                    f"dataset={self.dataset!r} is a hub dataset, read with the datasets library: pip install datasets"
                ) from e

    def _columns(self) -> tuple[str, str | None, str]:
        return self.text_column, self.text_pair_column, self.label_column

    def _hub_split(self, split: str, arg: str, limit: int | None) -> list[Example]:
        import datasets

        try:
            ds = datasets.load_dataset(self.dataset, self.dataset_config, split=split)
        except ValueError as e:
            # The datasets library raises ValueError for an unknown split, naming the ones that exist.
            raise ValueError(
                f"loading dataset={self.dataset!r}, dataset_config={self.dataset_config!r}, {arg}={split!r} failed: {e}"
            ) from e
        ds = ds.shuffle(seed=0)
        if limit:
            ds = ds.select(range(min(limit, len(ds))))
        names = [c for c in self._columns() if c is not None]
        missing = [c for c in names if c not in ds.column_names]
        if missing:
            raise ValueError(
                f"columns {missing} are not in dataset={self.dataset!r} split {split!r}; its columns are "
                f"{ds.column_names}: set text_column=, text_pair_column= or label_column="
            )
        # Whole columns at once: row-by-row access to an Arrow-backed dataset is far slower.
        columns = [list(ds[c]) for c in names]
        rows = [dict(zip(names, values)) for values in zip(*columns)]
        return _examples(rows, f"dataset={self.dataset!r} split {split!r}", *self._columns())

    def _data(self, size: TaskSize) -> tuple[list[Example], list[Example]]:
        if self.dataset is not None:
            return (
                self._hub_split(self.train_split, "train_split", size.train_examples),
                self._hub_split(self.eval_split, "eval_split", size.eval_examples),
            )
        assert self.train_file is not None
        train = _examples(read_records(self.train_file), f"train_file={self.train_file!r}", *self._columns())
        random.Random(0).shuffle(train)
        if self.eval_file is not None:
            held = _examples(read_records(self.eval_file), f"eval_file={self.eval_file!r}", *self._columns())
            random.Random(0).shuffle(held)
        else:
            if len(train) < 2:
                raise ValueError(f"train_file={self.train_file!r} has {len(train)} row; 10% of it cannot be held out")
            n_held = max(1, round(len(train) * HELD_OUT))
            train, held = train[n_held:], train[:n_held]
        if size.train_examples:
            train = train[: size.train_examples]
        if size.eval_examples:
            held = held[: size.eval_examples]
        return train, held

    def build(self, *, seed: int, size: TaskSize, device: torch.device) -> Workload:
        self.check()
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        train_raw, held_raw = self._data(size)
        to_index, label_names = _label_map([y for *_, y in train_raw + held_raw], self.label_column)
        if len(label_names) < 2:
            raise ValueError(
                f"label_column={self.label_column!r} has one class {label_names}; classification needs two"
            )
        train = [(t, p, to_index[y]) for t, p, y in train_raw]
        held = [(t, p, to_index[y]) for t, p, y in held_raw]
        if size.batch_size > len(train):
            raise ValueError(
                f"batch_size={size.batch_size} is larger than the {len(train)} training examples; "
                "raise train_examples or lower batch_size"
            )

        tok = AutoTokenizer.from_pretrained(self.model_name)
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            self.model_name,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
        ).to(device)
        if tok.pad_token is None:
            # Decoder-only models (GPT-2 and kin) ship no padding token; reuse end-of-sequence, as their docs advise.
            tok.pad_token = tok.eos_token
            model.config.pad_token_id = tok.pad_token_id

        def encode(rows: list[tuple[str, str | None, int]]) -> dict[str, Any]:
            texts = [t for t, _, _ in rows]
            pairs = None if self.text_pair_column is None else [p for _, p, _ in rows]
            enc = tok(texts, pairs, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            enc["labels"] = torch.tensor([y for _, _, y in rows])
            return {k: v.to(device) for k, v in enc.items()}

        return sequence_classification_workload(
            model,
            train,
            held,
            encode,
            seed=seed,
            batch_size=size.batch_size,
            eval_batch=EVAL_BATCH,
            info={
                "model": self.model_name,
                "data": self.dataset or self.train_file,
                "labels": label_names,
                "train_examples": len(train),
                "eval_examples": len(held),
            },
        )
