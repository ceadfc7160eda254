"""Train a small CNN from scratch on Fashion-MNIST (28x28 grey clothing images, 10 classes).

The paper's ResNet-on-ImageNet setting, scaled down to run on a CPU. Data: the
Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``,
the original idx files). Split: the 60,000-image train file, shuffled once with
seed 0 (a stage takes its first ``train_examples``), and the first
``eval_examples`` (default 2,000) of the 10,000-image test file for evaluation.
Seeds change the initialisation and the order of the batches, not the split.
Model: conv(1->32, 3x3)-ReLU-maxpool, conv(32->64, 3x3)-ReLU-maxpool,
linear(1600->128)-ReLU, linear(128->10): 225,034 parameters, the largest tensor
204,800 elements (so MicroAdam's 4096-element blocks are exercised).
"""

from __future__ import annotations

import functools
import gzip
import os

import numpy as np
import torch

from microadam.bench.tasks.base import MissingDependency, Task, TaskSize, Workload, tensor_classification_workload

__all__ = ["FashionTask", "load_fashion"]

DATA_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL = "apt-get install dataset-fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# Mean and std of the 60,000 training images' pixels scaled to [0, 1] (measured: 0.28604, 0.35302).
MEAN, STD = 0.2860, 0.3530
EVAL_EXAMPLES = 2000
EVAL_CHUNK = 500


def _paths(data_dir: str) -> dict[str, str]:
    paths = {k: os.path.join(data_dir, f) for k, f in FILES.items()}
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if missing:
        raise MissingDependency(
            f"the fashion task needs Fashion-MNIST; not found: {', '.join(missing)}. "
            f"Install it with `{INSTALL}` (files land in {DATA_DIR}) or pass data_dir= to the folder holding them"
        )
    return paths


def _read_idx(path: str, offset: int, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    header = np.frombuffer(raw, ">i4", count=offset // 4)
    data = np.frombuffer(raw, np.uint8, offset=offset)
    if header[0] != magic or data.size != int(np.prod(header[1:])):
        raise ValueError(f"{path} is not a valid idx file (magic {header[0]}, expected {magic}); reinstall: {INSTALL}")
    return data


@functools.lru_cache(maxsize=2)
def load_fashion(data_dir: str = DATA_DIR) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_images, train_labels, test_images, test_labels) as uint8 tensors, images (N, 1, 28, 28), file order.

    Cached per ``data_dir``: every seed and optimizer of a comparison reads the same 30 MB once.
    """
    paths = _paths(data_dir)
    out = []
    for split in ("train", "test"):
        images = _read_idx(paths[f"{split}_images"], 16, 2051).reshape(-1, 1, 28, 28)
        labels = _read_idx(paths[f"{split}_labels"], 8, 2049)
        if len(images) != len(labels):
            raise ValueError(
                f"{split}: {len(images)} images but {len(labels)} labels in {data_dir}; reinstall: {INSTALL}"
            )
        out += [torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))]
    return out[0], out[1], out[2], out[3]


def _normalize(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255.0 - MEAN) / STD


def _cnn() -> torch.nn.Sequential:
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 32, 3),  # 28 -> 26, pooled to 13
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3),  # 13 -> 11, pooled to 5
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 5 * 5, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


class FashionTask(Task):
    name = "fashion"
    metric = "accuracy"
    higher_is_better = True
    description = "small CNN (225k params) on Fashion-MNIST from scratch (60k train, first 2,000 of test held out)"
    # Starting points, not tuned: AdamW's usual 1e-3 for a small CNN; MicroAdam a guess 3x higher,
    # as on digits, since its sparse update moves fewer coordinates per step.
    default_lr = {"microadam": 3e-3, "adamw": 1e-3, "lion": 1e-4, "*": 1e-3}

    def __init__(self, data_dir: str = DATA_DIR) -> None:
        self.data_dir = str(data_dir)

    def check(self) -> None:
        _paths(self.data_dir)

    def build(self, *, seed: int, size: TaskSize, device: torch.device) -> Workload:
        self.check()
        xtr, ytr, xte, yte = load_fashion(self.data_dir)
        # The split is fixed (seed 0) so seeds vary the model and the order, not the data.
        order = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(0))
        if size.train_examples:
            order = order[: size.train_examples]
        xtr, ytr = xtr[order].to(device), ytr[order].to(device)
        n_eval = size.eval_examples or EVAL_EXAMPLES
        xte, yte = _normalize(xte[:n_eval]).to(device), yte[:n_eval].to(device)
        if size.batch_size > len(ytr):
            raise ValueError(
                f"batch_size={size.batch_size} is larger than the {len(ytr)} training images; "
                "raise train_examples or lower batch_size"
            )
        torch.manual_seed(seed)
        model = _cnn().to(device)
        # Inputs kept as uint8 and normalized per batch: the full train split is 47 MB instead of 188 MB.
        return tensor_classification_workload(
            model,
            (xtr, ytr),
            (xte, yte),
            seed=seed,
            batch_size=size.batch_size,
            transform=_normalize,
            eval_chunk=EVAL_CHUNK,
            info={
                "model": "CNN conv32-conv64-fc128-fc10",
                "data": self.data_dir,
                "train_examples": len(ytr),
                "eval_examples": len(yte),
            },
        )
