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


def _compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from microadam.bench.optimizers import OPTIMIZERS
    from microadam.bench.report import render_markdown, write_reports
    from microadam.bench.runner import run_plan
    from microadam.bench.spec import QUICK_PLAN, PlanError, load_plan, parse_plan
    from microadam.bench.tasks import MissingDependency
    from microadam.bench.verdict import final_verdict

    if args.list_optimizers:
        for name, spec in OPTIMIZERS.items():
            state = "installed" if spec.installed() else f"not installed: {spec.install}"
            print(f"{name:20s} {spec.label:28s} {state}")
        return 0
    try:
        plan = load_plan(args.plan) if args.plan else parse_plan(QUICK_PLAN)
    except PlanError as e:
        print(f"microadam compare: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or Path("runs") / plan.name)
    print(f"plan {plan.name!r} ({'built-in' if not args.plan else args.plan}) -> {out}")

    def stage_done(stage: object, rows: list) -> None:
        from microadam.bench.runner import read_records

        write_reports(plan, read_records(out / "records.jsonl"), out)

    try:
        records = run_plan(plan, out, on_stage_done=stage_done)
    except (PlanError, MissingDependency) as e:
        print(f"microadam compare: {e}", file=sys.stderr)
        return 2
    md, page = write_reports(plan, records, out)
    print()
    print(render_markdown(plan, records))
    print(f"records: {out / 'records.jsonl'}\nreport: {md}\nhtml report: {page}")
    verdict = final_verdict(plan, records)
    return 1 if args.strict and any(not v.startswith("PASS") for v in verdict.values()) else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``microadam`` command."""
    parser = argparse.ArgumentParser(prog="microadam", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small MLP on digits with MicroAdam and AdamW; print both")
    demo.add_argument("--epochs", type=int, default=10)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="comma-separated learning rates to try for each")
    demo.set_defaults(func=_demo)
    cmp_ = sub.add_parser(
        "compare",
        help="staged comparison of MicroAdam against baselines on a real task, with a verdict and a report",
        description="Run a comparison plan (TOML; see docs/compare.md). Without PLAN, the built-in quick plan: "
        "MiniLM fine-tuned on tweet sentiment, MicroAdam and 8-bit AdamW against AdamW, 2 seeds, 2 stages.",
    )
    cmp_.add_argument("plan", nargs="?", help="a plan TOML file (default: the built-in quick plan)")
    cmp_.add_argument("--out", help="output directory (default runs/<plan name>); rerun to resume")
    cmp_.add_argument("--strict", action="store_true", help="exit 1 if any candidate fails the bar")
    cmp_.add_argument("--list-optimizers", action="store_true", help="list optimizers and whether installed")
    cmp_.set_defaults(func=_compare)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
