"""What a task gives the runner: a model, batches, a loss, an evaluation."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "MissingDependency",
    "Task",
    "TaskSize",
    "Workload",
    "endless",
    "sequence_classification_workload",
    "tensor_classification_workload",
]


class MissingDependency(RuntimeError):
    """A task's data or library is not installed; the message says how to install it."""


@dataclass(frozen=True)
class TaskSize:
    """How big a stage runs a task.

    Attributes:
        steps: optimizer steps.
        batch_size: examples per step.
        train_examples: size of the training subset (``None``: the task's whole training split).
        eval_examples: size of the held-out subset evaluated at the end (``None``: the task's default).
        eval_every: also evaluate every this many steps (0: only at the end).
    """

    steps: int
    batch_size: int
    train_examples: int | None = None
    eval_examples: int | None = None
    eval_every: int = 0


@dataclass
class Workload:
    """One seeded instance of a task, ready to train.

    Attributes:
        model: the module to train (on ``device``).
        batches: an endless iterator of training batches (seeded, in the task's format).
        loss: ``loss(model, batch)`` returns the scalar training loss.
        evaluate: ``evaluate(model)`` returns held-out metrics, e.g. ``{"accuracy": .., "val_loss": ..}``.
        params: the parameters (or param groups) handed to the optimizer; default all of ``model``'s.
        info: facts for the report (model name, parameter count, data sizes).
    """

    model: torch.nn.Module
    batches: Iterator[Any]
    loss: Callable[[torch.nn.Module, Any], torch.Tensor]
    evaluate: Callable[[torch.nn.Module], dict[str, float]]
    params: list[Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Task:
    """Base class of a built-in task.

    Subclasses set ``name``, ``metric`` (the headline metric, a key of what
    ``evaluate`` returns), ``higher_is_better`` and ``default_lr`` (per
    optimizer name, with ``"*"`` as the fallback), and implement
    :meth:`check` and :meth:`build`.
    """

    name: str = ""
    metric: str = "accuracy"
    higher_is_better: bool = True
    default_lr: dict[str, float] = {}
    description: str = ""

    def check(self) -> None:
        """Raise :class:`MissingDependency` (with the install command) if the task cannot run here."""

    def build(self, *, seed: int, size: TaskSize, device: torch.device) -> Workload:
        """A fresh, seeded workload: the same seed gives the same model and data order."""
        raise NotImplementedError

    def lr_for(self, optimizer: str) -> float:
        """The documented default learning rate of ``optimizer`` on this task."""
        # Both MicroAdam variants start from the same documented rate.
        optimizer = {"microadam_paper": "microadam"}.get(optimizer, optimizer)
        return self.default_lr[optimizer] if optimizer in self.default_lr else self.default_lr["*"]


def endless(make_epoch: Callable[[int], Iterator[Any]]) -> Iterator[Any]:
    """Repeat epochs forever; ``make_epoch(epoch)`` yields one shuffled epoch."""
    epoch = 0
    while True:
        batches = 0
        for batch in make_epoch(epoch):
            batches += 1
            yield batch
        if not batches:
            # Epochs drop their last partial batch: with fewer examples than one batch, every epoch
            # is empty and this loop would spin forever without yielding.
            raise ValueError(
                "an epoch has no full batch: batch_size is larger than the training subset; "
                "lower batch_size or raise train_examples"
            )
        epoch += 1


@contextlib.contextmanager
def no_loading_bars() -> Iterator[None]:
    """Hide transformers' own progress bars while a model loads: its "Loading weights" bar was drawn on
    every run of a compare, between the runner's lines (tweets, fortunes, text-classification).
    huggingface_hub's download bars stay on, as a first download can take minutes; both are put back
    as they were."""
    from huggingface_hub import utils as hub
    from transformers.utils import logging as hf_logging

    if not hf_logging.is_progress_bar_enabled():
        yield  # already off (HF_HUB_DISABLE_PROGRESS_BARS=1, or the caller's choice)
        return
    downloads_on = not hub.are_progress_bars_disabled()
    # transformers' switch flips huggingface_hub's too, and huggingface_hub warns at each flip when
    # HF_HUB_DISABLE_PROGRESS_BARS=0 is set: that asks for download bars, which stay on anyway.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_logging.disable_progress_bar()
        if downloads_on:
            hub.enable_progress_bars()
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf_logging.enable_progress_bar()
            if not downloads_on:
                hub.disable_progress_bars()


def tensor_classification_workload(
    model: torch.nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    held: tuple[torch.Tensor, torch.Tensor],
    *,
    seed: int,
    batch_size: int,
    info: dict[str, Any],
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    eval_chunk: int = 500,
) -> Workload:
    """The workload of a classifier on in-memory tensors (digits, fashion, ``examples/own_task.py``).

    ``train`` and ``held`` are (inputs, class indices) on the model's device. Batches are whole
    batches of a seeded shuffle per epoch (``transform``, if given, applied to each training batch's
    inputs); the loss is cross-entropy; evaluation, in eval mode and chunks of ``eval_chunk``, returns
    accuracy and mean loss on ``held``.
    """
    xtr, ytr = train
    xte, yte = held
    gen = torch.Generator().manual_seed(seed)

    def epoch(_: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(len(ytr), generator=gen).to(ytr.device)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            yield (xtr[idx] if transform is None else transform(xtr[idx])), ytr[idx]

    def loss(m: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(m(batch[0]), batch[1])

    @torch.no_grad()
    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        was_training = m.training
        m.eval()
        correct, loss_sum = 0, 0.0
        for i in range(0, len(yte), eval_chunk):
            logits, y = m(xte[i : i + eval_chunk]), yte[i : i + eval_chunk]
            correct += (logits.argmax(1) == y).sum().item()
            loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        m.train(was_training)
        return {"accuracy": correct / len(yte), "val_loss": loss_sum / len(yte)}

    model.train()
    return Workload(model, endless(epoch), loss, evaluate, info=info)


def sequence_classification_workload(
    model: torch.nn.Module,
    train: list[Any],
    held: list[Any],
    encode: Callable[[list[Any]], dict[str, Any]],
    *,
    seed: int,
    batch_size: int,
    info: dict[str, Any],
    eval_batch: int = 100,
) -> Workload:
    """The workload of a Hugging Face sequence-classification model (tweets, text-classification).

    ``encode(rows)`` turns a list of examples into model inputs with ``labels``; batches are the
    training rows in a seeded shuffled order; evaluation returns accuracy and mean loss on ``held``.
    """
    import random

    rng = random.Random(seed)

    def epoch(_: int) -> Iterator[dict[str, Any]]:
        order = list(range(len(train)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield encode([train[j] for j in order[i : i + batch_size]])

    def loss(m: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return m(**batch).loss

    @torch.no_grad()
    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        was_training = m.training
        m.eval()
        correct, total, loss_sum = 0, 0, 0.0
        for i in range(0, len(held), eval_batch):
            batch = encode(held[i : i + eval_batch])
            out = m(**batch)
            correct += (out.logits.argmax(-1) == batch["labels"]).sum().item()
            loss_sum += out.loss.item() * len(batch["labels"])
            total += len(batch["labels"])
        m.train(was_training)
        return {"accuracy": correct / total, "val_loss": loss_sum / total}

    model.train()
    return Workload(model, endless(epoch), loss, evaluate, info=info)
