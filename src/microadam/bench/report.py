"""Markdown and self-contained HTML reports, rendered from the records alone."""

from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import Any

from microadam.bench.spec import Plan
from microadam.bench.verdict import final_verdict, judge_stage, select_runs, summarize

__all__ = ["render_markdown", "render_html", "write_reports"]

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def _fmt_bytes(n: float) -> str:
    if n != n:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _cell(text: Any) -> str:
    """``text`` for one Markdown table cell: on one line, its pipes escaped. A run's error message
    can hold newlines (transformers' OSError does) and split the row, its later lines then landing
    outside the table, in the HTML report too."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _line(text: Any) -> str:
    """``text`` on one line, for a list item."""
    return " ".join(str(text).split())


def _metric_cell(s: dict[str, Any]) -> str:
    scale = 100 if s["metric"] == "accuracy" else 1
    digits = 2 if scale == 100 else 4
    return f"{scale * s['metric_mean']:.{digits}f} ± {scale * s['metric_std']:.{digits}f}"


def _examples(asked: int | None, rows: list[dict[str, Any]], key: str) -> str:
    """The subset size a stage used: a task caps what the plan asks at the size of its data, and
    the report gives the number the runs actually had."""
    used = sorted({r["info"][key] for r in rows if isinstance(r.get("info"), dict) and key in r["info"]})
    if not used:
        return str(asked or "all")
    text = "/".join(str(n) for n in used)
    if asked is None:
        return f"{text} (all)"
    if used != [asked]:
        return f"{text} (the plan asked for {asked}: more than the data has)"
    return text


def _stage_tables(plan: Plan, selected: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines: list[str] = []
    for stage in plan.stages:
        rows = selected.get(stage.name, [])
        if not rows:
            lines += [f"### Stage '{stage.name}': not run", ""]
            continue
        summary = summarize(rows)
        first = next((s for s in summary.values() if s["status"] == "ok"), None)
        metric = first["metric"] if first else "metric"
        unit = " (%)" if metric == "accuracy" else ""
        ok_rows = [r for r in rows if r.get("status") == "ok"]
        lines += [
            f"### Stage '{stage.name}': {stage.steps} steps x batch {stage.batch_size}, "
            f"train examples {_examples(stage.train_examples, ok_rows, 'train_examples')}, "
            f"eval examples {_examples(stage.eval_examples, ok_rows, 'eval_examples')}, seeds {list(stage.seeds)}"
            + ("" if plan.lr_schedule == "constant" else f", lr decayed to 0 ({plan.lr_schedule})"),
            "",
            f"| optimizer | lr | {metric}{unit} mean ± std | final train loss | state | bytes/param | "
            "peak memory | step time (median) | optimizer step | total |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for _name, s in summary.items():
            if s["status"] != "ok":
                lines.append(f"| {_cell(s['label'])} | | {_cell('; '.join(s['failures']))} | | | | | | | |")
                continue
            div = _cell(f" (failed: {'; '.join(s['failures'])})") if s["failures"] else ""
            lines.append(
                f"| {_cell(s['label'])} | {s['lr']:g} | {_metric_cell(s)}{div} | {s['final_train_loss']:.4f} | "
                f"{_fmt_bytes(s['state_bytes'])} | {s['bytes_per_param']:.3f} | {_fmt_bytes(s['peak_memory_bytes'])} | "
                f"{1000 * s['step_time_median_s']:.1f} ms | {1000 * s['optimizer_step_median_s']:.2f} ms | "
                f"{s['total_time_s']:.1f} s |"
            )
        lines.append("")
        judgement = judge_stage(plan, stage, rows)
        if judgement:
            lines += [f"Verdict against the baseline ({plan.baseline}):", ""]
            lines += ["| candidate | result | criteria |", "|---|---|---|"]
            for cand, j in judgement.items():
                checked = [ch["detail"] + _noise(ch) for ch in j["criteria"] if ch["limit"] is not None]
                details = "; ".join(checked) or j.get("reason", "")
                word = "PASS" if j["passed"] else "INVALID" if j.get("invalid") else "FAIL"
                lines.append(f"| {_cell(cand)} | {word} | {_cell(details)} |")
            lines.append("")
    return lines


def _noise(check: dict[str, Any]) -> str:
    if "noise" not in check:
        return ""
    if check.get("single_seed"):
        return " (one seed: no estimate of the seed noise)"
    return f" (seed noise ±{check['noise']:.2g})"


def _bar(value: float | None, text: str, unit: str) -> str:
    return f"- {text} <= {value:g}{unit}" if value is not None else f"- {text}: not checked"


def render_markdown(plan: Plan, records: list[dict[str, Any]]) -> str:
    """The report as Markdown, from the records of this plan's runs only (see ``select_runs``)."""
    c = plan.criteria
    selected = select_runs(plan, records)
    # Every distinct machine and set of versions the judged runs came from, with the runs of each: a
    # resumed compare may have run its stages on different machines, and its time and memory ratios
    # then compare across them.
    envs: list[tuple[dict[str, Any], list[str]]] = []
    for stage_name, rows in selected.items():
        for r in rows:
            if "env" not in r:
                continue
            runs = next((names for e, names in envs if e == r["env"]), None)
            if runs is None:
                envs.append((r["env"], runs := []))
            runs.append(f"{stage_name} {r['optimizer']} seed {r['seed']}")
    # The output folder's first plan fixed the bar (the runner refuses another bar there); a later
    # edit of the plan (other seeds, stages) keeps that date but has a fingerprint of its own.
    header = next((r for r in records if r.get("kind") == "plan"), {})
    fixed = f"acceptance bar fixed {header.get('date', 'before the run')}"
    if header.get("fingerprint") not in (None, plan.fingerprint()):
        fixed += f" (when this output folder was started, by the plan's version `{header['fingerprint']}`)"
    lines = [
        f"# microadam compare: {plan.name}",
        "",
        f"Task **{plan.task}**, baseline **{plan.baseline}**, candidates {', '.join(plan.candidates)}. "
        f"Plan fingerprint `{plan.fingerprint()}`, {fixed}.",
        "",
        "## Acceptance bar (fixed before the run)",
        "",
        _bar(c.max_metric_drop, "metric drop against the baseline", "")
        + " (accuracy points, or percent of the baseline's loss for a loss metric)",
        _bar(c.max_state_ratio, "optimizer state", " x the baseline's"),
        _bar(c.max_step_time_ratio, "median training-step time", " x the baseline's"),
    ]
    if c.max_peak_memory_ratio is not None:
        lines.append(_bar(c.max_peak_memory_ratio, "peak memory", " x the baseline's"))
    lines += ["", "## Verdict", ""]
    for cand, v in final_verdict(plan, records).items():
        lines.append(f"- **{cand}**: {_line(v)}")
    lines += ["", "## Stages", ""]
    lines += _stage_tables(plan, selected)
    if envs:
        lines += ["## Machine", ""]
        if len(envs) == 1:
            lines += [", ".join(f"{k} {v}" for k, v in envs[0][0].items()), ""]
        else:
            lines += [
                f"**The runs come from {len(envs)} different machines or versions**: step time and peak memory "
                "ratios compare runs of different machines where a stage mixes them. Rerun on one machine "
                "(a new --out) for ratios that count.",
                "",
            ]
            for i, (env, runs) in enumerate(envs):
                lines += [f"{i + 1}. " + ", ".join(f"{k} {v}" for k, v in env.items()) + f" ({', '.join(runs)})"]
            lines.append("")
        lines += [
            "Peak memory is what each run added to the process's resident set at its high-water mark (CPU; "
            "after a warm-up, so that the process's one-time costs fall in none of the runs; docs/compare.md), "
            "or CUDA's max allocated bytes (GPU). Step time is the median over steps after the first two of "
            "forward + backward + optimizer step.",
            "",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------- SVG plots


def _svg_lines(
    series: list[tuple[str, str, list[tuple[float, float]]]],
    title: str,
    xlabel: str,
    ylabel: str,
    log_y: bool = False,
    label_points: bool = False,
) -> str:
    """Lines (or single points) with a legend of one entry per label, to the right of the plot."""
    w, h, pad, legend_w = 800, 340, 56, 190
    right = w - legend_w

    def ty(y: float) -> float:
        return math.log10(y) if log_y else y

    pts = [p for _, _, s in series for p in s if all(math.isfinite(v) for v in p) and (p[1] > 0 or not log_y)]
    if not pts:
        return ""
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(ty(p[1]) for p in pts), max(ty(p[1]) for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def sx(x: float) -> float:
        return pad + (x - x0) / (x1 - x0) * (right - pad - 10)

    def sy(y: float) -> float:
        return h - pad - (ty(y) - y0) / (y1 - y0) * (h - 2 * pad)

    def tick(v: float) -> str:
        return f"{10**v:.3g}" if log_y else f"{v:.3g}"

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" font-family="sans-serif">',
        f'<text x="{right / 2}" y="20" text-anchor="middle" font-size="14">{html.escape(title)}</text>',
        f'<line x1="{pad}" y1="{h - pad}" x2="{right - 10}" y2="{h - pad}" stroke="#333"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#333"/>',
        f'<text x="{right / 2}" y="{h - 14}" text-anchor="middle" font-size="12">{html.escape(xlabel)}</text>',
        f'<text x="14" y="{h / 2}" font-size="12" transform="rotate(-90 14 {h / 2})" '
        f'text-anchor="middle">{html.escape(ylabel + (" (log scale)" if log_y else ""))}</text>',
        f'<text x="{pad - 4}" y="{h - pad}" text-anchor="end" font-size="10">{tick(y0)}</text>',
        f'<text x="{pad - 4}" y="{pad + 4}" text-anchor="end" font-size="10">{tick(y1)}</text>',
        f'<text x="{pad}" y="{h - pad + 14}" text-anchor="middle" font-size="10">{x0:.3g}</text>',
        f'<text x="{right - 10}" y="{h - pad + 14}" text-anchor="middle" font-size="10">{x1:.3g}</text>',
    ]
    legend: dict[str, str] = {}
    for label, color, s in series:
        s = [p for p in s if all(math.isfinite(v) for v in p) and (p[1] > 0 or not log_y)]
        if len(s) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.2" opacity="0.8" points="{path}"/>')
        for x, y in s if len(s) == 1 else []:
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="{color}"/>')
            if label_points:
                out.append(f'<text x="{sx(x) + 7:.1f}" y="{sy(y) + 4:.1f}" font-size="10">{html.escape(label)}</text>')
        legend.setdefault(label, color)
    for i, (label, color) in enumerate(legend.items()):
        y = pad + 16 * i
        out.append(f'<rect x="{right + 6}" y="{y - 9}" width="10" height="10" fill="{color}"/>')
        out.append(f'<text x="{right + 20}" y="{y}" font-size="11">{html.escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _svg_bars(items: list[tuple[str, str, float]], title: str, unit: str) -> str:
    if not items:
        return ""
    w, bar_h, pad = 640, 22, 170
    h = 40 + bar_h * len(items)
    # No finite value at all (every run diverged within its first steps, so none has a step time):
    # the bars are drawn empty rather than the report not written.
    top = max((v for _, _, v in items if math.isfinite(v)), default=1.0) or 1.0
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">',
        f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="14">{html.escape(title)}</text>',
    ]
    for i, (label, color, v) in enumerate(items):
        y = 30 + i * bar_h
        length = 0 if not math.isfinite(v) else (w - pad - 80) * v / top
        out.append(f'<text x="{pad - 6}" y="{y + 14}" text-anchor="end" font-size="11">{html.escape(label)}</text>')
        out.append(f'<rect x="{pad}" y="{y}" width="{length:.1f}" height="{bar_h - 6}" fill="{color}"/>')
        out.append(f'<text x="{pad + length + 4}" y="{y + 14}" font-size="11">{v:.3g} {unit}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _markdown_to_html(md: str) -> str:
    """Enough Markdown for our own reports: headings, bullet lists, tables, paragraphs."""
    out, in_table, in_list = [], False, False
    for line in md.splitlines():
        if line.startswith("|"):
            # Split on the row's own pipes, not on a cell's escaped ones (_cell).
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
            if set("".join(cells)) <= {"-"}:
                continue
            if not in_table:
                out.append("<table>")
                in_table = True
                out.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr>")
            else:
                out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            text = html.escape(line[2:]).replace("**", "")
            out.append(f"<li>{text}</li>")
            continue
        if in_list:
            out.append("</ul>")
            in_list = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{html.escape(line).replace('**', '')}</p>")
    if in_table:
        out.append("</table>")
    if in_list:
        out.append("</ul>")
    return "\n".join(out)


def render_html(plan: Plan, records: list[dict[str, Any]]) -> str:
    """A self-contained HTML page: the Markdown report plus inline SVG plots, no external assets."""
    body = [_markdown_to_html(render_markdown(plan, records)), "<h2>Plots</h2>"]
    runs = [r for rows in select_runs(plan, records).values() for r in rows if r.get("status") == "ok"]
    names = list(dict.fromkeys(r["optimizer"] for r in runs))
    color = {n: COLORS[i % len(COLORS)] for i, n in enumerate(names)}
    for stage in plan.stages:
        rows = [r for r in runs if r["stage"] == stage.name]
        if not rows:
            continue
        series = [(r["optimizer"], color[r["optimizer"]], [tuple(p) for p in r["loss_curve"]]) for r in rows]
        body.append(_svg_lines(series, f"Training loss, stage {stage.name} (every seed)", "step", "loss", log_y=True))
        summary = summarize(rows)
        ok = {n: s for n, s in summary.items() if s["status"] == "ok"}
        metric = next(iter(ok.values()))["metric"] if ok else "metric"
        scatter = [(n, color[n], [(s["bytes_per_param"], s["metric_mean"])]) for n, s in ok.items()]
        body.append(
            _svg_lines(
                scatter,
                f"{metric} (mean over seeds) against optimizer state, stage {stage.name}",
                "optimizer state (bytes per parameter)",
                metric,
                label_points=True,
            )
        )
        bars = [(n, color[n], 1000 * s["step_time_median_s"]) for n, s in ok.items()]
        body.append(_svg_bars(bars, f"Median training-step time, stage {stage.name}", "ms"))
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "font-size:13px}th{background:#f3f3f3}svg{display:block;margin:1em 0}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>microadam compare: "
        f"{html.escape(plan.name)}</title><style>{style}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def write_reports(plan: Plan, records: list[dict[str, Any]], out_dir: Path) -> tuple[Path, Path]:
    """Write report.md and report.html into ``out_dir`` (atomically) and return their paths."""
    paths = []
    for name, text in (("report.md", render_markdown(plan, records)), ("report.html", render_html(plan, records))):
        path = out_dir / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")  # the HTML says utf-8; the locale's encoding may lack "±"
        tmp.replace(path)
        paths.append(path)
    return paths[0], paths[1]
