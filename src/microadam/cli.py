"""The ``microadam`` command line."""

from __future__ import annotations

import argparse
import math
import os
import sys

__all__ = ["main"]

# Exit codes of `microadam compare`: 1 is --strict's "a candidate did not pass", 2 a usage error (as
# argparse), and 3 a verdict that could not be reached (INVALID: the baseline's runs failed, or a
# candidate is not installed).
EXIT_INVALID = 3


def _demo(args: argparse.Namespace) -> int:
    import torch

    from microadam import MicroAdam
    from microadam.bench.digits import train_digits

    makers = {
        "MicroAdam": lambda lr: lambda p: MicroAdam(p, lr=lr),
        "AdamW": lambda lr: lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0),
    }
    lrs = args.lrs
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


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (zero epochs would divide by zero in the report)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _learning_rates(text: str) -> list[float]:
    """argparse type: comma-separated finite learning rates > 0, such as 3e-4,1e-3."""
    lrs = []
    for part in text.split(","):
        try:
            lr = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{part.strip()!r} in {text!r} is not a number; give comma-separated learning rates such as 3e-4,1e-3"
            ) from None
        if not (math.isfinite(lr) and lr > 0):
            raise argparse.ArgumentTypeError(f"learning rates must be finite and > 0, got {part.strip()!r} in {text!r}")
        lrs.append(lr)
    return lrs


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
    if any(v.startswith("INVALID") for v in verdict.values()):
        # Nothing was compared (the baseline's runs failed, a candidate is not installed): no verdict, which a script
        # must notice even without --strict; a FAIL is a verdict and exits 0.
        return EXIT_INVALID
    return 1 if args.strict and any(not v.startswith("PASS") for v in verdict.values()) else 0


def _plan(args: argparse.Namespace) -> int:
    from microadam import plan

    knobs = dict(
        param_dtype=args.param_dtype,
        grad_dtype=args.grad_dtype,
        window=args.window,
        density=args.density,
        block_size=args.block_size,
        quant_block_size=args.quant_block_size,
        galore_rank=args.galore_rank,
    )
    try:
        if args.max_model:
            if args.batch_size is not None or args.seq_len is not None:
                raise ValueError(
                    "--max-model counts weights, gradients and optimizer state only; the activation estimate "
                    "(--batch-size, --seq-len) needs a model's shape: leave them out, or give MODEL without --max-model"
                )
            if args.gpu is None:
                raise ValueError("--max-model needs --gpu, e.g. --gpu H100-80GB or --gpu 24GB")
            if args.model is not None:
                raise ValueError(f"--max-model answers for a bare parameter count; leave out MODEL ({args.model!r})")
            budget = plan.parse_budget(args.gpu)
            fits = plan.largest_model(budget, **knobs)
            print(plan.format_largest(fits, budget, plan.PlanSettings(**knobs)))
            return 0
        if args.model is None:
            raise ValueError("give MODEL (a config.json, .safetensors, hub name or count such as 7e9), or --max-model")
        result = plan.plan_memory(args.model, gpu=args.gpu, batch_size=args.batch_size, seq_len=args.seq_len, **knobs)
    except (ValueError, TypeError, ImportError) as e:
        print(f"microadam plan: error: {e}", file=sys.stderr)
        return 2
    print(plan.format_plan(result))
    return 0


def _add_plan_parser(sub: argparse._SubParsersAction) -> None:
    from microadam.plan import GPUS

    p = sub.add_parser(
        "plan",
        help="will my model fit? memory of weights, gradients and optimizer state for MicroAdam and its peers",
        description="Bytes of weights, gradients and optimizer state for AdamW, 8-bit/4-bit AdamW, Adafactor, "
        "GaLore, Adam-mini, Lion and MicroAdam, and which fit a GPU; or, with --max-model, the largest model "
        "that fits. Figures match microadam.plan.plan_memory / largest_model.",
        epilog=f"Known GPUs: {', '.join(GPUS)}. A bare parameter count is modelled as 4096x4096 matrices.",
    )
    p.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="a config.json or folder with one, a .safetensors file or folder of them (with a "
        "model.safetensors.index.json, only the shards it names; the index file itself works too), a Hugging Face "
        "hub name (needs transformers and a network), or a parameter count such as 7e9, 125M, 1.3B",
    )
    p.add_argument(
        "--param-dtype",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="weights (default fp32, as with mixed precision)",
    )
    p.add_argument("--grad-dtype", choices=("fp32", "bf16", "fp16"), default=None, help="default: --param-dtype")
    p.add_argument("--window", type=int, default=10, help="MicroAdam window m (default 10)")
    p.add_argument("--density", type=float, default=0.01, help="MicroAdam Top-K density (default 0.01)")
    p.add_argument("--block-size", type=int, default=4096, help="MicroAdam Top-K block (default 4096)")
    p.add_argument("--quant-block-size", type=int, default=128, help="MicroAdam error quantization block (128)")
    p.add_argument("--galore-rank", type=int, default=128, help="GaLore rank r (default 128)")
    p.add_argument(
        "--gpu", help="budget: a card name (e.g. A100-80GB, H100-80GB, RTX4090-24GB) or a size (24GB, 80GiB)"
    )
    p.add_argument("--batch-size", type=int, help="with --seq-len: add a rough activation estimate (printed formula)")
    p.add_argument("--seq-len", type=int, help="with --batch-size: sequence length of the activation estimate")
    p.add_argument(
        "--max-model",
        action="store_true",
        help="print the largest model that fits --gpu per optimizer (weights, gradients and state; activations "
        "not counted, so --batch-size and --seq-len are refused with it)",
    )
    p.set_defaults(func=_plan)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``microadam`` command."""
    parser = argparse.ArgumentParser(prog="microadam", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small MLP on digits with MicroAdam and AdamW; print both")
    demo.add_argument("--epochs", type=_positive_int, default=10, help="passes over the training split (default 10)")
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of the split, the initialisation and the batch order (default 0)"
    )
    demo.add_argument(
        "--lrs",
        type=_learning_rates,
        default="3e-4,1e-3,3e-3",
        help="comma-separated learning rates to try for each (default 3e-4,1e-3,3e-3)",
    )
    demo.set_defaults(func=_demo)
    _add_plan_parser(sub)
    cmp_ = sub.add_parser(
        "compare",
        help="staged comparison of MicroAdam against baselines on a real task, with a verdict and a report",
        description="Run a comparison plan (TOML; see docs/compare.md). Without PLAN, the built-in quick plan: "
        "MiniLM fine-tuned on tweet sentiment, MicroAdam and 8-bit AdamW against AdamW, 2 seeds, 2 stages.",
        epilog=f"Exit status: 0 when a verdict was reached (PASS or FAIL), 1 with --strict when a candidate did not "
        f"pass, 2 for a usage or plan error, {EXIT_INVALID} when a candidate's verdict is INVALID (the baseline's "
        "runs failed, or the candidate is not installed: nothing was compared).",
    )
    cmp_.add_argument("plan", nargs="?", help="a plan TOML file (default: the built-in quick plan)")
    cmp_.add_argument("--out", help="output directory (default runs/<plan name>); rerun to resume")
    cmp_.add_argument("--strict", action="store_true", help="exit 1 if any candidate fails the bar")
    cmp_.add_argument("--list-optimizers", action="store_true", help="list optimizers and whether installed")
    cmp_.set_defaults(func=_compare)
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe shows up here when output is buffered
    except BrokenPipeError:
        # The reader went away (`microadam plan 7e9 | head -1`): stop quietly. Point stdout at
        # devnull so the interpreter's final flush does not fail again (Python's signal docs, "Note
        # on SIGPIPE"); 141 = 128 + SIGPIPE, what a shell reports for a tool ended by a closed pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    return code


if __name__ == "__main__":
    sys.exit(main())
