"""The ``microadam`` command line."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    import torch

    from microadam import MicroAdam
    from microadam.bench.digits import train_digits

    makers = {
        "MicroAdam": lambda lr: lambda p: MicroAdam(p, lr=lr),
        "AdamW": lambda lr: lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0),
    }
    lrs = [float(x) for x in args.lrs.split(",")]
    print(f"Digits MLP, {args.epochs} epochs, seed {args.seed} (scikit-learn digits, 80/20 split); each optimizer")
    print(f"at learning rates {lrs}, best compared with best.")
    print("| optimizer | lr | test accuracy | final train loss | state bytes | bytes/param | seconds |")
    print("|---|---|---|---|---|---|---|")
    best = {}
    for name, make in makers.items():
        for lr in lrs:
            r = train_digits(name, make(lr), epochs=args.epochs, seed=args.seed)
            print(
                f"| {name} | {lr:g} | {r.accuracy:.4f} | {r.final_loss:.4f} | {r.state_bytes:,} | "
                f"{r.bytes_per_param:.3f} | {r.seconds:.1f} |"
            )
            if name not in best or r.accuracy > best[name][1].accuracy:
                best[name] = (lr, r)
    (m_lr, micro), (a_lr, adamw) = best["MicroAdam"], best["AdamW"]
    print(
        f"Best MicroAdam (lr {m_lr:g}) {micro.accuracy:.4f} vs best AdamW (lr {a_lr:g}) {adamw.accuracy:.4f}: "
        f"{100 * (micro.accuracy - adamw.accuracy):+.2f} points with {micro.state_bytes / adamw.state_bytes:.1%} "
        "of AdamW's optimizer state. One seed: differences of a point are noise."
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``microadam`` command."""
    parser = argparse.ArgumentParser(prog="microadam", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small MLP on digits with MicroAdam and AdamW; print both")
    demo.add_argument("--epochs", type=int, default=10)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="comma-separated learning rates to try for each")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
