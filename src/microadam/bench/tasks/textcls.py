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

Local paths (files and model folders) are relative to the current directory; a
leading ``~`` is the home directory. Columns: ``text_column=`` (default ``"text"``),
``text_pair_column=`` for pairs such as MNLI's premise / hypothesis, ``label_column=``
(default ``"label"``). Labels may be integers (kept; ``num_labels`` is the largest plus
one) or strings (sorted and numbered); a missing label (an empty cell, null, NaN or
"nan") is an error naming the file's line, and so is a label of ``eval_file`` that
``train_file`` never uses. Both splits are shuffled once with seed 0 and a stage
takes the first ``train_examples`` and ``eval_examples`` (default: all), so
label-sorted sources still give mixed subsets. Seeds change the new head's
initialisation and the order of the batches, not the split. Batches are
tokenized as they are drawn, padded to their longest text (at most
``max_length`` tokens).

What can be checked without loading the model or reading the data is checked
when the task is built, so a compare plan with a wrong path or column stops
before any run: the model folder, the files, their type and their columns.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from collections.abc import Callable, Iterable
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

__all__ = ["TextClassificationTask", "read_records"]

HELD_OUT = 0.1
EVAL_BATCH = 64
EXTENSIONS = (".csv", ".json", ".jsonl")
SHOWN = 10  # label names listed in an error before "..."

Example = tuple[str, str | None, Any]  # (text, text pair or None, raw label)


def _resolved(path: str) -> str:
    """``path`` as an error shows it: absolute, and for a relative one the directory it was taken from."""
    full = os.path.abspath(path)
    return full if os.path.isabs(path) else f"{full}, resolved relative to the current directory {os.getcwd()}"


def _read(path: str) -> tuple[list[dict[str, Any]], Callable[[int], str]]:
    """The rows of a local data file, and where row ``i`` is in it, as an error shows it ("line 7").

    Errors give the line a text editor shows: CSV rows are counted by the csv module's line
    count (so a quoted cell over several lines, or a skipped blank line, does not shift them) and
    JSON lines by their newlines. A JSON list has no useful line, so its rows are counted instead.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        return _read_csv(path)
    if ext not in EXTENSIONS:
        raise ValueError(f"{path}: unsupported file type {ext!r}; give a .csv, .json or .jsonl file")
    # utf-8-sig: Excel and Windows tools write a byte-order mark, which plain utf-8 would keep as
    # part of the first column's name ('\ufefftext'); without a mark it reads as utf-8.
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    if ext == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError:
            rows = None  # not one document: read it as JSON lines, as the datasets library does
        if isinstance(rows, list):
            return rows, lambda i: f"item {i + 1} (1-based) of the JSON list"
        if rows is not None and not isinstance(rows, dict):
            raise ValueError(f"{path}: expected a JSON list of objects or one object per line")
        # One object (a file of one example) is one JSON line: read below as such.
    rows, lines = [], []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters that
    # splitlines() ends a line at, which would cut an object in two and shift the line numbers.
    for number, line in enumerate(text.split("\n"), start=1):
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
        lines.append(number)
    return rows, lambda i: f"line {lines[i]}"


def _read_csv(path: str) -> tuple[list[dict[str, Any]], Callable[[int], str]]:
    """A CSV file's rows as ``csv.DictReader`` gives them, with the line each row starts on."""
    rows, lines = [], []
    with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: as in _read
        reader = csv.reader(f)
        header = next(reader, None)
        # Columns after the last named one (a header's trailing commas) hold nothing: a cell there is
        # as extra as one past the header. An unnamed column before a named one (pandas' index) is data.
        width = max((i + 1 for i, name in enumerate(header or []) if name.strip()), default=0)
        while header is not None:
            # A row starts on the line after the last one read; line_num counts the lines of a
            # quoted cell that spans several, so a row's number is its first line's.
            start = reader.line_num + 1
            values = next(reader, None)
            if values is None:
                break
            if not values:
                continue  # a blank line, skipped as DictReader skips it
            extra = [v for v in values[width:] if v.strip()]
            if extra:
                # DictReader files extra cells under the key None and reads on: a comma inside an unquoted
                # text ('great, really,1') would shift the label column to ' really' and make it a class.
                raise ValueError(
                    f"{path}, line {start}: {len(values)} cells, but the header names {width} columns "
                    f"{header[:width]}; the extra cells are {extra[:3]}. A cell holding a comma must be in double "
                    'quotes ("great, really"), as csv writers and spreadsheets write it: quote it, or delete the '
                    "extra cells"
                )
            row: dict[Any, Any] = dict(zip(header, values))
            # As DictReader: missing cells are None (then an error if a used column is missing); empty
            # extra cells, as a trailing comma leaves, are dropped.
            row.update({name: None for name in header[len(values) :]})
            rows.append(row)
            lines.append(start)
    return rows, lambda i: f"line {lines[i]}"


def read_records(path: str) -> list[dict[str, Any]]:
    """The rows of a local ``.csv``, ``.json`` (a list of objects, or JSON lines) or ``.jsonl`` file, as dicts."""
    return _read(path)[0]


def _first_columns(path: str) -> list[str] | None:
    """The columns of a data file's first row, from its first line alone (None: not known so cheaply).

    A CSV header, or the keys of the first object of JSON lines (or of a one-line JSON list);
    a JSON list over many lines is left to the full read when the task builds.
    """
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8-sig", newline="" if ext == ".csv" else None) as f:
        if ext == ".csv":
            return next(csv.reader(f), None)
        for line in f:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return None  # a JSON list over many lines, or a broken line: the full read says which
                if isinstance(first, list) and first:
                    first = first[0]
                return list(first) if isinstance(first, dict) else None
    return None


def _check_columns(options: Iterable[tuple[str, str | None]], present: Iterable[Any], source: str) -> None:
    """Each (option, column) asked for is among ``present`` (a first row's keys), or an error naming the fix."""
    names = sorted(c for c in present if isinstance(c, str))
    for option, column in options:
        if column is not None and column not in names:
            raise ValueError(
                f"{option}={column!r} is not a column of {source}; its columns are {names}: "
                f"set {option}= to one of them"
            )


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


def _examples(
    rows: list[dict[str, Any]],
    source: str,
    text: str,
    pair: str | None,
    label: str,
    where: Callable[[int], str],
) -> list[Example]:
    """(text, pair, raw label) of each row; ``where(i)`` says where row ``i`` is in ``source`` ("line 7")."""
    if not rows:
        raise ValueError(f"{source} has no rows")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ValueError(
                f"{source}, {where(i)}: a {type(r).__name__}, not an object with named columns; "
                'each row must be an object such as {"text": ..., "label": ...}'
            )
    columns = (("text_column", text), ("text_pair_column", pair), ("label_column", label))
    _check_columns(columns, rows[0], source)
    out = []
    for i, r in enumerate(rows):
        for arg, column in columns:
            if column is not None and _missing(r.get(column), column == label):
                raise ValueError(
                    f"{source}, {where(i)}: no value in {arg}={column!r} (got {r.get(column)!r}); "
                    "fill it in or drop the row"
                )
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


def _some(names: list[str]) -> str:
    """A list of label names for an error, cut after SHOWN (a file may have hundreds of classes)."""
    if len(names) <= SHOWN:
        return str(names)
    return f"{str(names[:SHOWN])[:-1]}, ...] ({len(names)} in all)"


def _looks_like_a_path(name: str) -> bool:
    """Whether ``model=`` can only name a local folder: a hub id is "name" or "owner/name", so it neither
    starts with ".", "/" or "~", nor ends with "/", nor holds a backslash or a second "/"."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")


def _check_model(model: str) -> str:
    """``model=`` as transformers should get it: a local folder (``~`` expanded) or a hub name.

    A path to nothing would reach transformers as a hub name and fail with "Repo id must use
    alphanumeric chars", which never says that the folder is missing.
    """
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        return path
    if not _looks_like_a_path(model):
        return model  # a hub name; transformers says if the hub has no such model
    hint = "give the folder save_pretrained wrote (with its config.json), or a hub name such as 'bert-base-uncased'"
    if os.path.exists(path):
        raise ValueError(f"model={model!r} is a file, not a folder ({_resolved(path)}); {hint}")
    raise ValueError(
        f"model={model!r} looks like a local folder, but it does not exist (looked for {_resolved(path)}); {hint}"
    )


def _unseen_labels(train: list[Example], held: list[Example], label_column: str) -> tuple[list[str], int, list[str]]:
    """The classes of ``held`` that ``train`` never uses, how many held examples have one, and train's classes."""
    to_index, names = _label_map([y for *_, y in train + held], label_column)
    in_train = {to_index[y] for *_, y in train}
    unseen = sorted({to_index[y] for *_, y in held} - in_train)
    count = sum(to_index[y] not in in_train for *_, y in held)
    return [names[i] for i in unseen], count, [names[i] for i in sorted(in_train)]


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
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
        self.model_name = _check_model(str(model))
        self.dataset = dataset
        self.dataset_config = dataset_config
        self.train_split = train_split
        self.eval_split = eval_split
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.label_column = label_column
        self.train_file = None if train_file is None else self._check_file("train_file", str(train_file))
        self.eval_file = None if eval_file is None else self._check_file("eval_file", str(eval_file))
        self.max_length = max_length

    def _check_file(self, arg: str, value: str) -> str:
        """The data file ``arg=value`` names (``~`` expanded), checked as far as its first row: it exists, is
        a type the task reads, and has the columns. Done here so a compare plan is refused before any run."""
        path = os.path.expanduser(value)
        if os.path.isdir(path):
            raise ValueError(
                f"{arg}={value!r} is a folder, not a file ({_resolved(path)}); give a .csv, .json or .jsonl file"
            )
        if not os.path.isfile(path):
            raise ValueError(f"{arg}={value!r} does not exist (looked for {_resolved(path)}); fix the path")
        ext = os.path.splitext(path)[1].lower()
        if ext not in EXTENSIONS:
            raise ValueError(f"{arg}={value!r}: unsupported file type {ext!r}; give a .csv, .json or .jsonl file")
        try:
            columns = _first_columns(path)
        except OSError as e:  # unreadable (permissions): a plan error now, not a failure of every run
            raise ValueError(f"{arg}={value!r} cannot be read ({e.strerror}): {_resolved(path)}") from e
        if columns is not None:
            options = zip(("text_column", "text_pair_column", "label_column"), self._columns())
            _check_columns(options, columns, f"{arg}={path!r}")
        return path

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
        return _examples(
            rows,
            f"dataset={self.dataset!r} split {split!r}",
            *self._columns(),
            lambda i: f"example {i} (0-based) of the split shuffled with seed 0",
        )

    def _file(self, arg: str, path: str) -> list[Example]:
        rows, where = _read(path)
        examples = _examples(rows, f"{arg}={path!r}", *self._columns(), where)
        random.Random(0).shuffle(examples)
        return examples

    def _data(self, size: TaskSize) -> tuple[list[Example], list[Example]]:
        if self.dataset is not None:
            return (
                self._hub_split(self.train_split, "train_split", size.train_examples),
                self._hub_split(self.eval_split, "eval_split", size.eval_examples),
            )
        assert self.train_file is not None
        train = self._file("train_file", self.train_file)
        if self.eval_file is not None:
            held = self._file("eval_file", self.eval_file)
            # A label the training file never uses is almost always the same class spelt another way
            # (neg / negative): kept, it would be a class of its own that the model never sees, every
            # such example scored wrong, and every optimizer equally wrong, so a compare would pass.
            unseen, count, known = _unseen_labels(train, held, self.label_column)
            if unseen:
                raise ValueError(
                    f"label_column={self.label_column!r}: eval_file={self.eval_file!r} has labels that "
                    f"train_file={self.train_file!r} never uses: {_some(unseen)} ({count} of its {len(held)} rows); "
                    f"the training labels are {_some(known)}. The model cannot learn to predict a label it "
                    "never trains on: spell each class the same in both files, or drop those rows from eval_file"
                )
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
        # The classes the examples use: integer labels make every class up to the largest, so labels
        # that are all 1 give two class names, one of which no example has.
        used = sorted({to_index[y] for *_, y in train_raw + held_raw})
        if len(used) < 2:
            raise ValueError(
                f"label_column={self.label_column!r} has one class {[label_names[i] for i in used]} in every "
                "row; classification needs two: check label_column=, or the files"
            )
        train = [(t, p, to_index[y]) for t, p, y in train_raw]
        held = [(t, p, to_index[y]) for t, p, y in held_raw]
        if size.batch_size > len(train):
            raise ValueError(
                f"batch_size={size.batch_size} is larger than the {len(train)} training examples; "
                "raise train_examples or lower batch_size"
            )

        with no_loading_bars():
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
