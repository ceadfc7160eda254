"""The guard on a real task: an MLP on scikit-learn's digits with MicroAdam, sabotaged twice.

At step 60 one gradient is NaN; from step 120 the learning rate is 20x too high. The guard skips
the first, rolls back and lowers the learning rate on the second, and writes its event log.

    python examples/guard_demo.py --log guard-events.jsonl
"""

from __future__ import annotations

import argparse

import torch

from microadam import MicroAdam
from microadam.bench.digits import load_digits_split
from microadam.guard import Guard, GuardPolicy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--log", default="guard-events.jsonl")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--no-faults", action="store_true", help="the same run without the sabotage")
    args = ap.parse_args()
    xtr, ytr, xte, yte = load_digits_split(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = MicroAdam(model.parameters(), lr=3e-3)
    guard = Guard(model, opt, GuardPolicy(snapshot_every=20, log_path=args.log))
    gen = torch.Generator().manual_seed(0)
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(ytr), (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        loss.backward()
        if step == 60 and not args.no_faults:
            model[0].weight.grad[0, 0] = float("nan")
        if step == 120 and not args.no_faults:
            for g in opt.param_groups:
                g["lr"] *= 20
        event = guard.step(loss)
        opt.zero_grad()
        if event and event.actions != ["none"]:  # the events that acted (the log has every one)
            print(f"step {step}: {event.event} -> {event.actions} {event.result}")
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    print(f"test accuracy {acc:.4f}, lr now {opt.param_groups[0]['lr']:.3g}, rollbacks {guard.rollbacks}")


if __name__ == "__main__":
    main()
