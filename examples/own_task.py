"""Your own workload in `microadam compare`: a template task.

A plan names it as ``task = "examples/own_task.py:BreastCancerTask"`` (the path relative to the
directory you run ``microadam compare`` from); ``examples/plans/own-task.toml`` does. Copy this
file, keep the class's shape, and put your model, data, loss and evaluation in ``build``:

- ``metric`` names the value of ``evaluate``'s dict that the acceptance bar judges (``higher_is_better``
  says which way is better); ``default_lr`` gives each optimizer's learning rate (``"*"``: the others),
  unless the plan sets ``lr`` in ``[optimizers.NAME]``.
- Constructor arguments are the plan's ``[task_options]`` (checked when the plan is read).
- ``build`` must be deterministic in ``seed`` (same seed, same model and batch order): every
  optimizer trains from the same start, and a resumed compare reruns only missing runs.
- ``size`` is the stage's: ``steps``, ``batch_size``, and the optional subset sizes.

The run key holds this file's contents, so editing it reruns the runs it shaped.

The data here is real and ships with scikit-learn: the Wisconsin breast-cancer set (569 tumours,
30 features, malignant or benign), a fixed 80/20 split, standardized on the training part.
"""

from __future__ import annotations

import torch

from microadam.bench.tasks import MissingDependency, Task, TaskSize, Workload
from microadam.bench.tasks.base import tensor_classification_workload


class BreastCancerTask(Task):
    name = "breast-cancer"
    metric = "accuracy"
    higher_is_better = True
    description = "MLP 30-hidden-2 on scikit-learn's breast-cancer set (fixed 80/20 split)"
    default_lr = {"microadam": 3e-3, "*": 1e-3}

    def __init__(self, hidden: int = 64) -> None:
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be a positive integer, got {hidden!r}")
        self.hidden = hidden

    def check(self) -> None:
        try:
            import sklearn.datasets  # noqa: F401
        except ImportError as e:
            raise MissingDependency("this task needs scikit-learn: pip install scikit-learn") from e

    def build(self, *, seed: int, size: TaskSize, device: torch.device) -> Workload:
        self.check()
        from sklearn.datasets import load_breast_cancer

        x, y = load_breast_cancer(return_X_y=True)
        x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # the split never moves
        cut = int(0.8 * len(y))
        xtr, ytr, xte, yte = x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]
        mean, std = xtr.mean(0), xtr.std(0)
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
        if size.train_examples:
            xtr, ytr = xtr[: size.train_examples], ytr[: size.train_examples]
        if size.eval_examples:
            xte, yte = xte[: size.eval_examples], yte[: size.eval_examples]
        xtr, ytr, xte, yte = (t.to(device) for t in (xtr, ytr, xte, yte))

        torch.manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Linear(30, self.hidden), torch.nn.ReLU(), torch.nn.Linear(self.hidden, 2)
        ).to(device)

        # Seeded shuffled batches, cross-entropy, accuracy and loss on the held-out part: the helper the
        # built-in digits and fashion tasks use. A task of another shape builds its own Workload(model,
        # batches, loss, evaluate, info=...): see microadam.bench.tasks.base.
        info = {"train_examples": len(ytr), "eval_examples": len(yte), "hidden": self.hidden}
        return tensor_classification_workload(
            model, (xtr, ytr), (xte, yte), seed=seed, batch_size=size.batch_size, info=info
        )
