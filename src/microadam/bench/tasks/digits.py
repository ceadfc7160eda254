"""Tiny real task: an MLP on scikit-learn's 8x8 digits (1,797 images). Seconds on a CPU; used in CI."""

from __future__ import annotations

import torch

from microadam.bench.tasks.base import MissingDependency, Task, TaskSize, Workload, tensor_classification_workload

__all__ = ["DigitsTask"]


class DigitsTask(Task):
    name = "digits"
    metric = "accuracy"
    higher_is_better = True
    description = "MLP 64-256-256-10 on scikit-learn digits (fixed-seed 80/20 split), from scratch"
    default_lr = {"microadam": 3e-3, "adamw": 1e-3, "lion": 1e-4, "*": 1e-3}

    def __init__(self, hidden: int = 256) -> None:
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be a positive integer (the MLP's width), got {hidden!r}")
        self.hidden = hidden

    def check(self) -> None:
        try:
            import sklearn.datasets  # noqa: F401
        except ImportError as e:
            raise MissingDependency("the digits task needs scikit-learn: pip install scikit-learn") from e

    def build(self, *, seed: int, size: TaskSize, device: torch.device) -> Workload:
        self.check()
        from microadam.bench.digits import load_digits_split

        # The split is fixed (seed 0) so seeds vary the model and the order, not the test set.
        xtr, ytr, xte, yte = load_digits_split(0)
        if size.train_examples:
            xtr, ytr = xtr[: size.train_examples], ytr[: size.train_examples]
        if size.eval_examples:
            xte, yte = xte[: size.eval_examples], yte[: size.eval_examples]
        xtr, ytr, xte, yte = (t.to(device) for t in (xtr, ytr, xte, yte))
        torch.manual_seed(seed)
        h = self.hidden
        model = torch.nn.Sequential(
            torch.nn.Linear(64, h), torch.nn.ReLU(), torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, 10)
        ).to(device)
        return tensor_classification_workload(
            model,
            (xtr, ytr),
            (xte, yte),
            seed=seed,
            batch_size=size.batch_size,
            info={"train_examples": len(ytr), "eval_examples": len(yte)},
        )
