"""bf16 parameters under MicroAdam: stochastic rounding vs round-to-nearest.

Trains the same MLP on scikit-learn's ``load_digits`` (fixed-seed stratified
80/20 split, standardized with the training statistics) with MicroAdam in
three arms that see identical initial weights and identical minibatches:

* ``fp32``    -- float32 parameters and forward pass: the reference;
* ``bf16-sr`` -- bfloat16 parameters and forward pass, ``stochastic_rounding=True``;
* ``bf16-rn`` -- bfloat16 parameters and forward pass, ``stochastic_rounding=False``
  (round to nearest even).

Two kinds of setting are run:

* ``scratch``  -- training from a random init at a usual learning rate;
* ``finetune`` -- small learning rates with and without weight decay,
  starting from a body pretrained (float32, ``torch.optim.AdamW``) on digits
  0-4 only with a freshly initialized 10-way head, trained on all ten classes. bf16 has 8 significant bits, so with
  round-to-nearest an update smaller than half an ulp of the weight (about
  ``|w| * 2**-9``) leaves the weight unchanged.

The initial weights are rounded to bf16-representable values for every arm,
so all arms start from exactly the same point. Besides final train loss and
test accuracy (both evaluated in float32 from the final weights) each run
reports how far its final weights are from the fp32 reference run of the same
seed: ``rel_l2`` = ||w - w_ref|| / ||w_ref|| and ``err_over_move`` =
||w - w_ref|| / ||w_ref - w_0|| (the error as a fraction of the reference's
own movement: 1.0 means as large as the whole update), and ``unchanged`` =
fraction of weights bit-identical to their initial value.

With ``--isolate`` the drift setting is also run with bf16 *storage* but a
float32 forward/backward (``bf16-*-f32c`` arms), so that the only difference
from the reference is what happens to the parameters (the bf16 gradient that
MicroAdam receives is the float32 gradient rounded to bf16).

Usage::

    python benchmarks/bf16_rounding.py --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sklearn
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.func import functional_call

import microadam
from microadam import MicroAdam

SPLIT_SEED = 0  # the train/test split is the same for every seed
PRETRAIN_CLASSES = 5  # the finetune checkpoint is pretrained on digits 0..4


@dataclass(frozen=True)
class Setting:
    """One hyperparameter setting; every arm and seed is run under it."""

    name: str
    lr: float
    weight_decay: float
    steps: int
    finetune: bool


@dataclass(frozen=True)
class Arm:
    """How parameters are stored and the forward pass computed."""

    name: str
    param_dtype: torch.dtype
    compute_dtype: torch.dtype
    stochastic_rounding: bool


FP32 = Arm("fp32", torch.float32, torch.float32, True)
MAIN_ARMS = (
    FP32,
    Arm("bf16-sr", torch.bfloat16, torch.bfloat16, True),
    Arm("bf16-rn", torch.bfloat16, torch.bfloat16, False),
)
ISOLATED_ARMS = (
    Arm("bf16-sr-f32c", torch.bfloat16, torch.float32, True),
    Arm("bf16-rn-f32c", torch.bfloat16, torch.float32, False),
)


@dataclass(frozen=True)
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data() -> Data:
    """Digits, stratified 80/20 split with a fixed seed, standardized on the training set."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=SPLIT_SEED, stratify=y)
    scaler = StandardScaler().fit(x_tr)
    return Data(
        torch.tensor(scaler.transform(x_tr), dtype=torch.float32),
        torch.tensor(y_tr, dtype=torch.int64),
        torch.tensor(scaler.transform(x_te), dtype=torch.float32),
        torch.tensor(y_te, dtype=torch.int64),
    )


def make_model(hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def bf16_representable(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float32 copies of ``state`` rounded to bf16 values, so every arm starts identically."""
    return {k: v.detach().to(torch.bfloat16).to(torch.float32) for k, v in state.items()}


def batch_schedule(n: int, steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Minibatch indices for ``steps`` steps: reshuffled epochs, shared by all arms of a seed."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    batches: list[torch.Tensor] = []
    while len(batches) < steps:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            batches.append(perm[i : i + batch_size])
            if len(batches) == steps:
                break
    return batches


def pretrain(data: Data, hidden: int, seed: int, steps: int, batch_size: int) -> dict[str, torch.Tensor]:
    """The finetune starting point: a body trained (float32 AdamW) on digits 0..4 only, with a fresh head."""
    torch.manual_seed(seed)
    model = make_model(hidden)
    keep = data.y_train < PRETRAIN_CLASSES
    x, y = data.x_train[keep], data.y_train[keep]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    for idx in batch_schedule(len(y), steps, batch_size, seed + 500):
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    # A fresh 10-way head, as when fine-tuning a pretrained body on a new label set.
    model[4].reset_parameters()
    return bf16_representable(model.state_dict())


def random_init(hidden: int, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return bf16_representable(make_model(hidden).state_dict())


@torch.no_grad()
def evaluate(state: dict[str, torch.Tensor], data: Data, hidden: int) -> tuple[float, float]:
    """(train loss, test accuracy) of float32 weights ``state``, computed in float32."""
    model = make_model(hidden)
    model.load_state_dict(state)
    train_loss = F.cross_entropy(model(data.x_train), data.y_train).item()
    acc = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    return train_loss, acc


def train(
    arm: Arm,
    setting: Setting,
    init: dict[str, torch.Tensor],
    batches: Sequence[torch.Tensor],
    data: Data,
    hidden: int,
    seed: int,
    variant: str,
) -> dict[str, torch.Tensor]:
    """Train one arm; return its final weights as float32 (exact copies of the stored values)."""
    model = make_model(hidden).to(arm.param_dtype)
    model.load_state_dict(init)
    opt = MicroAdam(
        model.parameters(),
        lr=setting.lr,
        weight_decay=setting.weight_decay,
        stochastic_rounding=arm.stochastic_rounding,
        seed=seed,
        variant=variant,
    )
    x_all = data.x_train.to(arm.compute_dtype)
    upcast = arm.compute_dtype != arm.param_dtype
    for idx in batches:
        if upcast:
            # bf16 storage, float32 math: the gradient reaching the bf16 leaf is the float32 one, rounded.
            params = {n: p.to(arm.compute_dtype) for n, p in model.named_parameters()}
            logits = functional_call(model, params, (x_all[idx],))
        else:
            logits = model(x_all[idx])
        loss = F.cross_entropy(logits.float(), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {k: v.detach().to(torch.float32) for k, v in model.state_dict().items()}


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1).double() for v in state.values()])


def versions() -> dict[str, str]:
    return {
        "microadam": microadam.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "sklearn": sklearn.__version__,
        "python": platform.python_version(),
    }


def settings(steps_scratch: int, steps_finetune: int) -> list[Setting]:
    out = [Setting("scratch", 1e-3, 0.0, steps_scratch, False)]
    for lr in (1e-4, 3e-5):
        for wd in (0.0, 0.01, 0.1):
            out.append(Setting("finetune", lr, wd, steps_finetune, True))
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def print_table(rows: list[dict]) -> None:
    """Mean ± std over seeds of every (setting, lr, weight decay, arm)."""
    keys: list[tuple[str, float, float, str]] = []
    for r in rows:
        key = (r["setting"], r["lr"], r["weight_decay"], r["arm"])
        if key not in keys:
            keys.append(key)
    header = (
        f"| {'setting':<8} | {'lr':>6} | {'wd':>4} | {'arm':<12} | {'train loss':>16} | {'test acc %':>12} "
        f"| {'rel L2 to fp32':>17} | {'err / move':>13} | {'unchanged %':>11} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for key in keys:
        sel = [r for r in rows if (r["setting"], r["lr"], r["weight_decay"], r["arm"]) == key]
        loss = mean_std([r["final_train_loss"] for r in sel])
        acc = mean_std([100 * r["test_accuracy"] for r in sel])
        rel = mean_std([r["rel_l2_to_fp32"] for r in sel])
        eom = mean_std([r["err_over_move"] for r in sel])
        unch = statistics.fmean([100 * r["unchanged_fraction"] for r in sel])
        print(
            f"| {key[0]:<8} | {key[1]:>6.0e} | {key[2]:>4g} | {key[3]:<12} | {loss[0]:>7.4f} ± {loss[1]:<6.4f} "
            f"| {acc[0]:>5.2f} ± {acc[1]:<4.2f} | {rel[0]:>7.5f} ± {rel[1]:<7.5f} "
            f"| {eom[0]:>5.3f} ± {eom[1]:<5.3f} | {unch:>11.2f} |"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--hidden", type=int, default=512, help="MLP width (64 -> h -> h -> 10)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps-scratch", type=int, default=400)
    parser.add_argument("--steps-finetune", type=int, default=600)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument(
        "--isolate",
        type=str,
        default="finetune:3e-05:0.01",
        help="setting 'name:lr:wd' also run with bf16 storage and float32 compute ('' for none)",
    )
    parser.add_argument(
        "--variant",
        default="release",
        help="MicroAdam variant (release: the default since 2026-11-30; the recorded run of 2026-11-28 was paper)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSONL to write (default: benchmarks/results/bf16_rounding.jsonl for --variant paper, "
        "bf16_rounding_<variant>.jsonl for another: a rerun does not overwrite another variant's recorded rows)",
    )
    args = parser.parse_args(argv)
    if args.out is None:
        suffix = "" if args.variant == "paper" else f"_{args.variant}"
        args.out = Path(f"benchmarks/results/bf16_rounding{suffix}.jsonl")

    torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    vers = versions()
    data = load_data()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"digits: {len(data.y_train)} train / {len(data.y_test)} test; MLP 64-{args.hidden}-{args.hidden}-10; "
        f"batch {args.batch_size}; seeds {args.seeds}; torch threads {torch.get_num_threads()}",
        flush=True,
    )

    rows: list[dict] = []
    pretrained: dict[int, dict[str, torch.Tensor]] = {}
    with args.out.open("w") as fh:
        for setting in settings(args.steps_scratch, args.steps_finetune):
            tag = f"{setting.name}:{setting.lr:g}:{setting.weight_decay:g}"
            arms = MAIN_ARMS + (ISOLATED_ARMS if tag == args.isolate else ())
            for seed in args.seeds:
                if setting.finetune:
                    if seed not in pretrained:
                        pretrained[seed] = pretrain(data, args.hidden, seed, args.pretrain_steps, args.batch_size)
                    init = pretrained[seed]
                else:
                    init = random_init(args.hidden, seed)
                init_loss, init_acc = evaluate(init, data, args.hidden)
                batches = batch_schedule(len(data.y_train), setting.steps, args.batch_size, seed)
                w0 = flat(init)
                ref: torch.Tensor | None = None
                for arm in arms:
                    t0 = time.perf_counter()
                    final = train(arm, setting, init, batches, data, args.hidden, seed, args.variant)
                    seconds = time.perf_counter() - t0
                    loss, acc = evaluate(final, data, args.hidden)
                    w = flat(final)
                    if ref is None:  # FP32 is first
                        ref = w
                    err = (w - ref).norm().item()
                    row = {
                        "config": f"{tag}:{arm.name}",
                        "setting": setting.name,
                        "arm": arm.name,
                        "param_dtype": str(arm.param_dtype).removeprefix("torch."),
                        "compute_dtype": str(arm.compute_dtype).removeprefix("torch."),
                        "stochastic_rounding": arm.stochastic_rounding if arm.param_dtype == torch.bfloat16 else None,
                        "seed": seed,
                        "variant": args.variant,
                        "lr": setting.lr,
                        "weight_decay": setting.weight_decay,
                        "steps": setting.steps,
                        "batch_size": args.batch_size,
                        "hidden": args.hidden,
                        "initial_train_loss": init_loss,
                        "initial_test_accuracy": init_acc,
                        "final_train_loss": loss,
                        "test_accuracy": acc,
                        "rel_l2_to_fp32": err / ref.norm().item(),
                        "err_over_move": err / (ref - w0).norm().item(),
                        "unchanged_fraction": (w == w0).double().mean().item(),
                        "seconds": round(seconds, 2),
                        "versions": vers,
                        "date": date,
                        "command": command,
                    }
                    rows.append(row)
                    fh.write(json.dumps(row) + "\n")
                    fh.flush()
                    print(
                        f"{row['config']:<32} seed {seed}: loss {loss:.4f} acc {100 * acc:5.2f}% "
                        f"(start {init_loss:.3f} / {100 * init_acc:5.2f}%) rel_l2 {row['rel_l2_to_fp32']:.5f} "
                        f"err/move {row['err_over_move']:.3f} unchanged {100 * row['unchanged_fraction']:.1f}% "
                        f"[{seconds:.1f}s]",
                        flush=True,
                    )
    print()
    print_table(rows)
    print(f"\nwrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
