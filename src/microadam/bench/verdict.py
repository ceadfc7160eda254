"""The acceptance bar applied to a stage's records: criterion by criterion, with margins."""

from __future__ import annotations

import math
import statistics
from typing import Any

from microadam.bench.spec import Plan, Stage

__all__ = ["judge_stage", "summarize", "final_verdict", "select_runs"]


def _stats(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _failure(r: dict[str, Any]) -> str | None:
    """Why a run cannot count (it failed, diverged or ended with a non-finite metric), or None."""
    if r.get("status") != "ok":
        message = r.get("message")
        return r.get("status", "error") + (f": {message}" if message else "")
    if "diverged_at" in r:
        return f"diverged (non-finite loss at step {r['diverged_at']})"
    value = r["metrics"].get(r["metric"])
    # Not a number: a record of an earlier version, which stored what evaluate returned as it was.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"ended with {r['metric']} = {value!r}"
    return None


def _failures(rows: list[dict[str, Any]]) -> list[str]:
    """One sentence per distinct failure, with the seeds it hit: "seeds 0, 1 not_installed: ..."."""
    seeds: dict[str, list[int]] = {}
    for r in rows:
        why = _failure(r)
        if why is not None:
            seeds.setdefault(why, []).append(r["seed"])
    return [f"seed{'s' if len(s) > 1 else ''} {', '.join(map(str, s))} {why}" for why, s in seeds.items()]


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per optimizer: mean and spread over seeds of every measured quantity.

    ``failures`` lists the seeds that cannot count (failed, diverged, non-finite metric), one
    sentence each; the means are over the other seeds, for the report only: a stage where any
    seed of an optimizer fails is not judged on means (see :func:`judge_stage`).
    """
    out: dict[str, dict[str, Any]] = {}
    by_opt: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_opt.setdefault(r["optimizer"], []).append(r)
    for name, rs in by_opt.items():
        ok = [r for r in rs if r.get("status") == "ok"]
        entry: dict[str, Any] = {"label": rs[0].get("label", name), "runs": len(ok), "seeds": [r["seed"] for r in ok]}
        entry["failures"] = _failures(rs)
        if not ok:
            entry["status"] = rs[0].get("status", "error")
            entry["message"] = rs[0].get("message", "")
            out[name] = entry
            continue
        entry["status"] = "ok"
        metric = ok[0]["metric"]
        entry["metric"] = metric
        entry["higher_is_better"] = ok[0]["higher_is_better"]
        entry["metric_mean"], entry["metric_std"] = _stats([r["metrics"][metric] for r in ok])
        entry["metric_values"] = [r["metrics"][metric] for r in ok]
        for key in (
            "state_bytes",
            "bytes_per_param",
            "peak_memory_bytes",
            "step_time_median_s",
            "optimizer_step_median_s",
            "total_time_s",
            "final_train_loss",
        ):
            entry[key], entry[key + "_std"] = _stats([r.get(key) for r in ok])
        # Rows of an older microadam have no basis: their CPU peak was the whole process's resident set.
        entry["peak_memory_basis"] = sorted({r.get("peak_memory_basis", "process") for r in ok})
        entry["lr"] = ok[0]["lr"]
        entry["diverged"] = [r["seed"] for r in ok if "diverged_at" in r]
        out[name] = entry
    return out


def _ratio(value: float, baseline: float) -> float:
    """value / baseline, where a baseline of 0 (a tiny model's run that added no page to the resident
    set) gives 1 for 0 and infinity for more, not a ZeroDivisionError."""
    if baseline == 0:
        return 1.0 if value == 0 else math.inf
    return value / baseline


# A value this close to the bar is on it: means of fractions carry float error (a drop of 1 example
# in 200 is 0.5000000000000004 points), and a candidate exactly on the bar must not fail by 4e-16.
_ON_THE_BAR = 1e-9


def _digits(value: float, limit: float) -> str:
    """``value`` with 3 significant digits, or as many more as it takes to differ from ``limit`` where
    it does: 0.20004 printed as 0.2 against a bar of 0.2 read as a pass that failed."""
    for digits in range(3, 13):
        text = f"{value:.{digits}g}"
        if value == limit or float(text) != limit:
            return text
    return repr(value)


def _check(name: str, value: float, limit: float | None, unit: str, what: str) -> dict[str, Any]:
    if limit is None:
        return {"name": name, "value": value, "limit": None, "passed": True, "detail": f"{what}: not checked"}
    tolerance = _ON_THE_BAR * max(1.0, abs(limit))
    passed = math.isfinite(value) and value <= limit + tolerance
    if passed and abs(value - limit) <= tolerance:
        # Float error, not a difference: 0.5000000000000004 is printed as what it is, the bar.
        detail = f"{what} {limit:g}{unit} <= {limit:g}{unit} (on the bar)"
    elif passed:
        detail = f"{what} {_digits(value, limit)}{unit} <= {limit:g}{unit}"
    elif math.isfinite(value):
        detail = f"{what} {_digits(value, limit)}{unit} > {limit:g}{unit}: failed by {value - limit:.3g}{unit}"
    else:
        detail = f"{what} could not be measured (diverged or failed)"
    return {"name": name, "value": value, "limit": limit, "passed": passed, "detail": detail}


def judge_stage(plan: Plan, stage: Stage, rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """For each candidate run in this stage: passed or not, and each criterion with its margin."""
    rows = [r for r in rows if r.get("stage") == stage.name]
    summary = summarize(rows)
    base = summary.get(plan.baseline)
    result: dict[str, dict[str, Any]] = {}
    # Every planned seed must have a record: means over the seeds that happen to be there would be
    # judged as if they were the plan's (a compare that was stopped, records of another version).
    missing = {
        name: [seed for seed in stage.seeds if not any(r["optimizer"] == name and r["seed"] == seed for r in rows)]
        for name in (plan.baseline, *plan.candidates)
    }
    for cand in plan.candidates:
        c = summary.get(cand)
        if c is None:
            continue
        gaps = [f"{name} seeds {missing[name]}" for name in (plan.baseline, cand) if missing[name]]
        if gaps:
            result[cand] = {
                "passed": False,
                "invalid": True,
                "reason": f"no record of {' and '.join(gaps)} of stage '{stage.name}'; rerun the same compare "
                "command in this --out (it runs only what is missing)",
                "criteria": [],
            }
            continue
        if base is None or base["failures"]:
            # Checked before the candidate's own failures: when the baseline's runs fail too (a
            # missing model, a data file without the label column) the cause is usually shared,
            # and calling the candidate FAIL would blame the optimizer for the setup.
            why = "; ".join(base["failures"]) if base else "not run"
            own = f"; {cand}'s own runs: {'; '.join(c['failures'])}" if c["failures"] else ""
            result[cand] = {
                "passed": False,
                "invalid": True,
                "reason": f"no valid comparison: the baseline {plan.baseline} has no result for every seed ({why})"
                f"{own}; fix the baseline's runs and rerun (runs that raised an error are tried again; a run "
                "that diverged or ended with a non-finite metric is a result of its settings and is kept, so "
                "change the baseline's settings, e.g. its lr)",
                "criteria": [],
            }
            continue
        own = [r for r in rows if r.get("optimizer") == cand and r.get("stage", stage.name) == stage.name]
        if own and all(r.get("status") == "not_installed" for r in own):
            # The optimizer never ran: no comparison was made, so no FAIL (which would read as "tried,
            # not good enough"); INVALID, and compare exits non-zero.
            result[cand] = {
                "passed": False,
                "invalid": True,
                "reason": f"{cand} did not run: {own[0].get('message', 'not installed')}; install it and rerun "
                "(the runs already made are reused)",
                "criteria": [],
            }
            continue
        if c["failures"]:
            # Means over the surviving seeds would hide the failure (an optimizer that crashes or
            # diverges on one seed in three is not adopted on the other two).
            result[cand] = {"passed": False, "reason": "; ".join(c["failures"]), "criteria": []}
            continue
        crit = plan.criteria
        unmeasured = [n for n, s in ((plan.baseline, base), (cand, c)) if not math.isfinite(s["peak_memory_bytes"])]
        if crit.max_peak_memory_ratio is not None and unmeasured:
            result[cand] = {
                "passed": False,
                "invalid": True,
                "reason": f"peak memory was not measured for {' and '.join(unmeasured)} (this machine has no "
                "/proc/self/statm and psutil is not installed), so max_peak_memory_ratio cannot be judged: "
                "pip install psutil and rerun in a new --out, or drop the criterion",
                "criteria": [],
            }
            continue
        bases = sorted(set(base["peak_memory_basis"]) | set(c["peak_memory_basis"]))
        if crit.max_peak_memory_ratio is not None and len(bases) > 1:
            result[cand] = {
                "passed": False,
                "invalid": True,
                "reason": f"the peak memory of {plan.baseline} and {cand} was measured in different ways "
                f"({', '.join(bases)}: records of different versions of microadam in one --out), so "
                "max_peak_memory_ratio cannot be judged: rerun in a new --out",
                "criteria": [],
            }
            continue
        if c["higher_is_better"]:
            drop = 100 * (base["metric_mean"] - c["metric_mean"])
            metric_check = _check("metric_drop", drop, crit.max_metric_drop, " pts", f"{c['metric']} drop")
        elif base["metric_mean"] == 0:
            # An increase over a baseline of exactly 0 (an error rate every seed drove to 0) is no
            # percentage: no increase passes any bar, any increase fails one.
            drop = 0.0 if c["metric_mean"] <= 0 else math.inf
            metric_check = _check("metric_drop", drop, crit.max_metric_drop, "%", f"{c['metric']} increase")
            if crit.max_metric_drop is not None:
                metric_check["detail"] = f"{c['metric']} {c['metric_mean']:.4g} against the baseline's 0: " + (
                    "no increase" if drop == 0 else "an increase from 0, beyond any percentage bar"
                )
        else:
            drop = 100 * (c["metric_mean"] - base["metric_mean"]) / abs(base["metric_mean"])
            metric_check = _check("metric_drop", drop, crit.max_metric_drop, "%", f"{c['metric']} increase")
        # Noise next to the difference: the larger of the two seed spreads, in the same unit.
        if c["higher_is_better"] or base["metric_mean"] != 0:
            scale = 100 if c["higher_is_better"] else 100 / abs(base["metric_mean"])
            noise = scale * max(c["metric_std"], base["metric_std"])
        else:
            noise = 0.0  # both sides of the comparison with 0 above are exact
        metric_check["noise"] = noise
        # One seed on either side gives no spread at all, not a spread of 0: the report says so.
        metric_check["single_seed"] = min(c["runs"], base["runs"]) < 2
        if crit.max_metric_drop is not None and abs(drop - crit.max_metric_drop) < noise:
            # The verdict still follows the means (the bar was fixed before the run), but says
            # when the seeds' spread is wider than the margin: more seeds would decide it.
            metric_check["inconclusive"] = True
            metric_check["detail"] += " (within the seeds' spread: more seeds would decide)"
        checks = [
            metric_check,
            _check(
                "state_ratio",
                c["state_bytes"] / base["state_bytes"] if base["state_bytes"] else float("inf"),
                crit.max_state_ratio,
                "x",
                "optimizer state ratio",
            ),
            _check(
                "step_time_ratio",
                c["step_time_median_s"] / base["step_time_median_s"],
                crit.max_step_time_ratio,
                "x",
                "step time ratio",
            ),
            _check(
                "peak_memory_ratio",
                _ratio(c["peak_memory_bytes"], base["peak_memory_bytes"]),
                crit.max_peak_memory_ratio,
                "x",
                "peak memory ratio",
            ),
        ]
        result[cand] = {"passed": all(ch["passed"] for ch in checks), "criteria": checks}
    return result


def select_runs(plan: Plan, records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Stage name -> the records of that stage that the runner judges for ``plan``.

    The same selection as :func:`microadam.bench.runner.run_plan`: only runs under this plan's run
    keys (a records file may also hold an earlier version of the plan: other seeds, another lr
    schedule), the latest record of each (a failed run is tried again on resume), and only for
    the candidates still in at each stage. A stage that no candidate reached is left out.
    """
    latest = {r["run_key"]: r for r in records if r.get("kind") == "run" and "run_key" in r}
    alive = list(plan.candidates)
    out: dict[str, list[dict[str, Any]]] = {}
    for stage in plan.stages:
        if not alive:
            break
        keys = [plan.run_key(stage, name, seed) for name in [plan.baseline, *alive] for seed in stage.seeds]
        out[stage.name] = rows = [latest[k] for k in keys if k in latest]
        for cand, j in judge_stage(plan, stage, rows).items():
            if not j["passed"]:
                alive.remove(cand)
    return out


def final_verdict(plan: Plan, records: list[dict[str, Any]]) -> dict[str, str]:
    """One sentence per candidate: adopted after all stages, or the stage and criterion where it failed.

    Only the records of this plan's runs count (see :func:`select_runs`).
    """
    selected = select_runs(plan, records)
    verdict = {}
    for cand in plan.candidates:
        verdict[cand] = "not run"
        for si, stage in enumerate(plan.stages):
            rows = selected.get(stage.name, [])
            if not any(r["optimizer"] == cand for r in rows):
                if si == 0:
                    # A candidate is run at the first stage whatever happens: no record of it means the
                    # compare did not finish (or the records are of another plan), not a verdict.
                    verdict[cand] = (
                        f"INVALID at stage '{stage.name}': no record of its runs; rerun the same compare command "
                        "in this --out (it runs only what is missing)"
                    )
                break
            j = judge_stage(plan, stage, rows).get(cand)
            if j is None:
                break
            if not j["passed"]:
                failed = [ch["detail"] for ch in j["criteria"] if not ch["passed"]] or [j.get("reason", "")]
                word = "INVALID" if j.get("invalid") else "FAIL"
                verdict[cand] = f"{word} at stage '{stage.name}': " + "; ".join(failed)
                break
            verdict[cand] = f"PASS through stage '{stage.name}'"
        else:
            verdict[cand] = f"PASS: met the bar at every stage ({', '.join(s.name for s in plan.stages)})"
    return verdict
