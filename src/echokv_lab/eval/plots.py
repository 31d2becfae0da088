"""Figures of an evaluation: score against the kept KV fraction, and NIAH depth heatmaps.

``rows`` are the result rows of ``results.json`` (see :mod:`echokv_lab.eval.report`): dicts with
``method``, ``compression_ratio``, ``kept_fraction``, ``task``, ``context_length``, ``score`` (in
[0, 1]), ``n`` and optionally ``depth`` and ``error``. The heatmap follows the needle-in-a-haystack
figures of the EchoKV paper (arXiv 2603.22910) and RULER (arXiv 2404.06654): context length on the
x axis, needle depth on the y axis, colour = score.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from echokv import plotting

FULL = "full"


def valid_rows(rows: Iterable[dict]) -> list[dict]:
    """Rows that carry a score (no ``error``)."""
    return [r for r in rows if not r.get("error") and r.get("score") is not None]


def weighted_mean(rows: Iterable[dict]) -> float:
    """Mean score weighted by each row's number of samples ``n``."""
    rows = list(rows)
    total = sum(max(int(r.get("n", 1)), 0) for r in rows)
    if total == 0:
        return sum(r["score"] for r in rows) / len(rows) if rows else float("nan")
    return sum(r["score"] * max(int(r.get("n", 1)), 0) for r in rows) / total


def task_means(rows: Iterable[dict]) -> dict[str, float]:
    """Mean score per task (weighted by ``n`` over context lengths and depths)."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r)
    return {task: weighted_mean(rs) for task, rs in by_task.items()}


def average_score(rows: Iterable[dict]) -> float:
    """Average over tasks of the per-task means (each task counts once, as RULER and LongBench)."""
    means = task_means(rows)
    return sum(means.values()) / len(means) if means else float("nan")


def frontier_points(rows: Iterable[dict]) -> dict[str, list[dict]]:
    """Per method, one point per compression ratio: the measured kept fraction (mean over its samples), the
    average score over tasks, and a Wilson 95 % interval over all its samples (pooled)."""
    from echokv_lab.eval.intervals import pooled, wilson

    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in valid_rows(rows):
        groups[(r["method"], float(r.get("compression_ratio", 0.0)))].append(r)
    out: dict[str, list[dict]] = defaultdict(list)
    for (method, ratio), rs in groups.items():
        n = sum(max(int(r.get("n", 1)), 0) for r in rs)
        kept = (sum(float(r.get("kept_fraction", 1.0)) * max(int(r.get("n", 1)), 0) for r in rs) / n if n
                else sum(float(r.get("kept_fraction", 1.0)) for r in rs) / len(rs))
        score = average_score(rs)
        _, total = pooled(rs)
        low, high = wilson(score, total)
        out[method].append({"ratio": ratio, "kept": kept, "score": score, "n": total, "ci_low": low, "ci_high": high})
    for points in out.values():
        points.sort(key=lambda p: p["kept"])
    return dict(out)


def plot_score_vs_kept(rows: Iterable[dict], path, title: str | None = None) -> Path:
    """The quality-vs-bytes frontier: one line per method, average score against the *measured* kept KV fraction,
    one point per compression ratio, with Wilson 95 % error bars; ``full`` is the star at 1.0 (and a dashed line,
    its interval shaded)."""
    points = frontier_points(rows)
    full = points.get(FULL, [None])[0]

    fig = plotting.figure((6.5, 4.2))
    ax = fig.add_subplot()
    for method in sorted(m for m in points if m != FULL):
        ps = points[method]
        xs = [p["kept"] for p in ps]
        ys = [p["score"] for p in ps]
        # (clamped: Wilson's bound at a score of 0 or 1 can sit a rounding error beyond it)
        err = [[max(0.0, p["score"] - p["ci_low"]) for p in ps], [max(0.0, p["ci_high"] - p["score"]) for p in ps]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, linewidth=1.2, markersize=4, label=method)
    if full is not None:
        ax.axhline(full["score"], color="black", linestyle="--", linewidth=1)
        ax.axhspan(full["ci_low"], full["ci_high"], color="black", alpha=0.07)
        ax.errorbar([1.0], [full["score"]], yerr=[[max(0.0, full["score"] - full["ci_low"])], [max(0.0, full["ci_high"] - full["score"])]],
                    marker="*", markersize=12, color="black", linestyle="none", capsize=3, label=FULL)
    ax.set_xlabel("measured kept KV fraction (stored bytes / full cache bytes)")
    ax.set_ylabel("average score (95% Wilson interval)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(0, 1.05)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    if points:
        ax.legend(fontsize=7, ncol=2)
    return plotting.save(fig, path, dpi=120)


def _flatten(by_kept: dict[float, list[dict]]) -> list[dict]:
    return [r for rs in by_kept.values() for r in rs]


def plot_niah_heatmap(rows: Iterable[dict], path, method: str, compression_ratio: float | None = None) -> Path:
    """Heatmap of a method's NIAH scores: context length (x) by needle depth (y), colour = score in [0, 1].

    Uses the rows of ``method`` that have a ``depth`` (and, if given, this ``compression_ratio``),
    averaging over tasks and samples in each cell (weighted by ``n``); empty cells stay blank.
    """
    cells: dict[tuple[int, float], list[dict]] = defaultdict(list)
    for r in valid_rows(rows):
        if r["method"] != method or r.get("depth") is None:
            continue
        if compression_ratio is not None and abs(float(r.get("compression_ratio", 0)) - compression_ratio) > 1e-9:
            continue
        cells[(int(r["context_length"]), round(float(r["depth"]), 4))].append(r)
    lengths = sorted({c for c, _ in cells})
    depths = sorted({d for _, d in cells})
    grid = [[float("nan")] * len(lengths) for _ in depths]
    for (c, d), rs in cells.items():
        grid[depths.index(d)][lengths.index(c)] = weighted_mean(rs)

    fig = plotting.figure((1.2 + 0.9 * max(len(lengths), 3), 1.2 + 0.45 * max(len(depths), 3)))
    ax = fig.add_subplot()
    image = ax.imshow(grid or [[float("nan")]], cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto",
                      origin="upper")
    ax.set_xticks(range(len(lengths)), [str(c) for c in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if not math.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    title = method if compression_ratio is None else f"{method} (compression {compression_ratio:g})"
    ax.set_title(f"NIAH: {title}")
    fig.colorbar(image, ax=ax, label="score")
    return plotting.save(fig, path, dpi=120)
