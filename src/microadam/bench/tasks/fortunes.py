"""Fine-tune the pretrained all-MiniLM-L6-v2 to name the category of a fortune cookie (many classes).

A fine-tune with a new many-class head, the case where a short run leaves an
optimizer the least room: the Debian ``fortunes`` package's 14,000 quotations
in 40 files (computers, food, law, love, politics, science, ...). The label is
the file a fortune comes from; files with fewer than ``MIN_PER_CLASS`` entries
are left out (32 classes remain, the largest holds 9% of the entries). Split:
deduplicated, shuffled with seed 0, ``HELD_OUT`` (1,000) held out for evaluation, the
rest for training (a stage takes its first ``train_examples``). Seeds change the
new head's initialisation and the batch order, not the split.

This task was added as a held-out check of the quality-gap work (docs/results.md):
no MicroAdam setting was chosen or tuned on it.
"""

from __future__ import annotations

import os
import random

import torch

from microadam.bench.tasks.base import MissingDependency, Task, TaskSize, Workload
from microadam.bench.tasks.tweets import _default_model, minilm_workload

__all__ = ["FortunesTask", "load_fortunes"]

DATA_DIR = "/usr/share/games/fortunes"
MIN_PER_CLASS = 100
HELD_OUT = 1000
INSTALL = "apt-get install fortunes  (Debian/Ubuntu), plus pip install 'microadam[tasks]' for MiniLM"


def _category_files(data_dir: str) -> list[str]:
    if not os.path.isdir(data_dir):
        raise MissingDependency(f"the fortunes task needs the fortune files in {data_dir}: {INSTALL}")
    # A category is a plain file with a strfile index next to it (.dat); .u8 names are symlinks.
    names = sorted(
        f
        for f in os.listdir(data_dir)
        if "." not in f
        and not os.path.islink(os.path.join(data_dir, f))
        and os.path.exists(os.path.join(data_dir, f + ".dat"))
    )
    if not names:
        raise MissingDependency(f"{data_dir} holds no fortune files: {INSTALL}")
    return names


def load_fortunes(data_dir: str = DATA_DIR) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    """(train, held_out, class names): (text, label) pairs, deduplicated, shuffled with seed 0."""
    by_class: dict[str, list[str]] = {}
    for name in _category_files(data_dir):
        with open(os.path.join(data_dir, name), encoding="utf-8", errors="replace") as f:
            entries = [" ".join(e.split()) for e in f.read().split("\n%\n")]
        by_class[name] = [e for e in entries if e and e != "%"]
    classes = sorted(c for c, es in by_class.items() if len(es) >= MIN_PER_CLASS)
    seen: set[str] = set()
    rows = []
    for label, c in enumerate(classes):
        for text in by_class[c]:
            if text not in seen:
                seen.add(text)
                rows.append((text, label))
    random.Random(0).shuffle(rows)
    held = min(HELD_OUT, len(rows) // 5)  # a fifth of a small corpus (a test's, a user's data_dir)
    return rows[held:], rows[:held], classes


class FortunesTask(Task):
    name = "fortunes"
    metric = "accuracy"
    higher_is_better = True
    description = "fine-tune pretrained all-MiniLM-L6-v2 to name a fortune's category (32 classes, 1,000 held out)"
    # The tweets task's rates, unchanged: this task is held out from tuning (see the module docstring).
    default_lr = {"microadam": 1e-4, "lion": 1e-5, "adafactor": 1e-4, "*": 3e-5}

    def __init__(self, model: str | None = None, max_length: int = 64, data_dir: str = DATA_DIR) -> None:
        self.model_name = model
        self.max_length = max_length
        self.data_dir = data_dir

    def check(self) -> None:
        try:
            import transformers  # noqa: F401
        except ImportError as e:
            raise MissingDependency(f"the fortunes task needs transformers: {INSTALL}") from e
        _category_files(self.data_dir)
        if self.model_name is None:
            _default_model()

    def build(self, *, seed: int, size: TaskSize, device: torch.device) -> Workload:
        self.check()
        train, held, classes = load_fortunes(self.data_dir)
        return minilm_workload(
            self.model_name,
            train,
            held,
            len(classes),
            seed=seed,
            size=size,
            device=device,
            max_length=self.max_length,
            info={"classes": len(classes)},
        )
