"""Write the results of an evaluation suite: ``results.json``, ``report.md`` and the figures.

A *row* is one (method, compression ratio, task, context length[, depth]) cell::

    {"method": "echokv", "compression_ratio": 0.5, "kept_fraction": 0.5, "task": "niah_single_1",
     "context_length": 4096, "score": 0.93, "n": 20, "depth": 0.25}

``score`` is in [0, 1] and ``n`` the number of samples behind it; a row with ``error`` (text)
records a method that failed, a row with ``skipped`` (text) one that did not run (a ratio it cannot reach,
no artifact for the ratio, the peers environment missing). ``ci_low`` / ``ci_high`` are the 95 % Wilson
interval of ``score`` (:mod:`echokv_lab.eval.intervals`). Rows may carry ``suite``; others belong to ``suite_name``.
The tables follow the way RULER and LongBench report: mean score per task (x100) and their
unweighted average, plus each method's average relative to the uncompressed ``full`` cache, the
figure of merit of the EchoKV paper (arXiv 2603.22910).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from echokv_lab.eval.plots import FULL, plot_niah_heatmap, plot_score_vs_kept, task_means, valid_rows

REQUIRED = ("method", "compression_ratio", "kept_fraction", "task", "context_length", "score", "n")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-") or "x"


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell (one line, no pipes, not too long)."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= 120 else text[:117] + "..."


def _group_key(row: dict) -> tuple[int, str, float]:
    # full first, then methods by name, then by compression ratio
    return (row["method"] != FULL, row["method"], float(row.get("compression_ratio", 0.0)))


def _pm(score: float, low: float, high: float) -> str:
    return f"{100 * score:.1f} ±{100 * (high - low) / 2:.1f}"


def _table(rows: list[dict]) -> list[str]:
    from echokv_lab.eval.intervals import pooled, wilson

    tasks = list(dict.fromkeys(r["task"] for r in rows if r.get("task") is not None and not r.get("skipped")))
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[_group_key(r)].append(r)
    full_rows = [r for key, rs in groups.items() if key[1] == FULL for r in rs]
    full_means = task_means(valid_rows(full_rows))

    lines = [
        "| method | compression | kept | n | " + " | ".join(tasks) + " | average | vs full |",
        "|---|---:|---:|---:|" + "---:|" * len(tasks) + "---:|---:|",
    ]
    notes = []
    for key in sorted(groups):
        group = groups[key]
        method, ratio = key[1], key[2]
        ok = valid_rows(group)
        n_ok = sum(int(r.get("n", 0)) for r in ok)
        kept_values = [(float(r["kept_fraction"]), int(r.get("n", 1))) for r in ok if r.get("kept_fraction") is not None]
        kept = (sum(k * n for k, n in kept_values) / max(sum(n for _, n in kept_values), 1)) if kept_values else None
        head = f"| {_cell(method)} | {ratio:g} | {'—' if kept is None else f'{kept:.3f}'} | {n_ok} |"
        skipped = [r for r in group if r.get("skipped")]
        if skipped and not ok:
            lines.append(head + f" {_cell(skipped[0]['skipped'])} |" + " — |" * (len(tasks) + 1))
            continue
        means = task_means(ok)
        errors = [r for r in group if r.get("error")]
        for r in errors:
            notes.append(f"- **{_cell(method)}** (compression {ratio:g}, task {r.get('task') or '-'}): "
                         f"{_cell(r['error'])}")
        if errors and not means:  # the method failed: show why instead of numbers
            lines.append(head + f" error: {_cell(errors[0]['error'])} |" + " — |" * (len(tasks) + 1))
            continue
        failed = {r.get("task") for r in errors}
        cells = []
        for t in tasks:
            if t in means:
                _, n_t = pooled([r for r in ok if r["task"] == t])
                cells.append(_pm(means[t], *wilson(means[t], n_t)))
            else:
                cells.append("error" if t in failed else "—")
        complete = all(t in means for t in tasks)
        average = sum(means.values()) / len(means) if complete else None
        common = [t for t in means if t in full_means]
        full_avg = sum(full_means[t] for t in common) / len(common) if common else 0.0
        relative = (
            f"{100 * (sum(means[t] for t in common) / len(common)) / full_avg:.1f}%"
            if complete and common and full_avg > 0 else "—"
        )
        avg_cell = _pm(average, *wilson(average, n_ok)) if average is not None else "—"
        lines.append(head + "".join(f" {c} |" for c in cells) + f" {avg_cell} | {relative} |")
    if notes:
        lines += ["", "Errors:", ""] + notes
    return lines


INTERVALS = ("Every score is followed by the half-width of its 95% Wilson interval (± points); a task's interval "
             "counts its samples over context lengths and depths, the average's all of the method's samples (`n`). "
             "Two methods whose intervals overlap may not differ: at n = 100 a score near 50 has a half-width of "
             "about 10 points, near 90 or 10 about 6. `kept` is the measured stored bytes over the full cache's bytes "
             "(the model's dtype), averaged over the samples.")


def write_results(rows, out_dir, suite_name: str) -> dict[str, Path]:
    """Write ``results.json``, ``report.md`` and the PNG figures into ``out_dir``; return their paths.

    ``report.md`` has, per suite, a table of methods (and compression ratios) by tasks with the
    mean score per task (x100), an ``average`` column and each method's average relative to
    ``full``; a method whose rows carry ``error`` shows the error text instead of numbers. It links
    the score-vs-kept-fraction figure and, when NIAH rows with a ``depth`` exist, one depth heatmap
    per method and compression ratio.
    """
    rows = [dict(r) for r in rows]
    for i, r in enumerate(rows):
        # A failed run may not know its numbers; it needs only its method.
        missing = [k for k in (("method",) if r.get("error") or r.get("skipped") else REQUIRED) if k not in r]
        if missing:
            raise ValueError(f"result row {i} lacks {', '.join(missing)}: {r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"results": out_dir / "results.json", "report": out_dir / "report.md"}
    written["results"].write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    by_suite: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_suite[r.get("suite") or suite_name].append(r)
    legend = ("Scores x100: mean per task over its samples (and context lengths / depths); `average` is the "
              "unweighted mean over tasks; `vs full` is that average relative to the uncompressed cache.")
    lines = [f"# EchoKV evaluation: {suite_name}", "", legend, "", INTERVALS, ""]
    for i, (suite, suite_rows) in enumerate(by_suite.items()):
        slug = _slug(suite)
        lines += [f"## {suite}", ""] + _table(suite_rows) + [""]
        name = "pareto.png" if i == 0 else f"{slug}_pareto.png"
        kept_png = plot_score_vs_kept(suite_rows, out_dir / name, title=f"{suite}: score vs measured kept fraction")
        written[f"{suite}:pareto"] = kept_png
        lines += [f"![{suite}: score vs measured kept KV fraction, 95% intervals]({kept_png.name})", ""]
        niah = [r for r in valid_rows(suite_rows) if r.get("depth") is not None]
        for method, ratio in sorted({(r["method"], float(r.get("compression_ratio", 0.0))) for r in niah}):
            png = plot_niah_heatmap(niah, out_dir / f"{slug}_niah_{_slug(method)}_{ratio:g}.png", method, ratio)
            written[f"{suite}:niah:{method}:{ratio:g}"] = png
            lines += [f"![{suite}: NIAH {method} (compression {ratio:g})]({png.name})", ""]
    written["report"].write_text("\n".join(lines), encoding="utf-8")
    return written
