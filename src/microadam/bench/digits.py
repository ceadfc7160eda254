"""A small real task: an MLP on scikit-learn's 8x8 digits (1,797 images, 10 classes).

It is the quick end-to-end check of the project: seconds on a CPU, real data
that ships inside scikit-learn, a fixed-seed 80/20 split.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from microadam.memory import state_bytes

__all__ = ["DigitsResult", "load_digits_split", "train_digits"]


@dataclass
class DigitsResult:
    optimizer: str
    accuracy: float
    final_loss: float
    state_bytes: int
    num_params: int
    seconds: float

    @property
    def bytes_per_param(self) -> float:
        return self.state_bytes / self.num_params


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test), standardized with the training split's statistics."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits task needs scikit-learn: pip install 'microadam[demo]' (or pip install scikit-learn)"
        ) from e
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    tr, te = perm[:cut], perm[cut:]
    mean, std = x[tr].mean(0), x[tr].std(0).clamp_min(1e-3)
    return (x[tr] - mean) / std, y[tr], (x[te] - mean) / std, y[te]


def train_digits(
    name: str,
    make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    *,
    epochs: int = 10,
    batch_size: int = 64,
    hidden: int = 512,
    seed: int = 0,
) -> DigitsResult:
    """Train a 64-hidden-hidden-10 MLP and return its held-out accuracy and optimizer state bytes."""
    xtr, ytr, xte, yte = load_digits_split(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    )
    params = list(model.parameters())
    opt = make_optimizer(params)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    loss = torch.tensor(float("nan"))
    for _ in range(epochs):
        order = torch.randperm(len(ytr), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    return DigitsResult(name, acc, loss.item(), state_bytes(opt), sum(p.numel() for p in params), seconds)
