"""results.json, report.md and figures (echokv_lab.eval.report, echokv_lab.eval.plots)."""

from __future__ import annotations

import json

import pytest

from echokv_lab.eval.intervals import wilson
from echokv_lab.eval.plots import (
    average_score,
    frontier_points,
    plot_niah_heatmap,
    plot_score_vs_kept,
    task_means,
)
from echokv_lab.eval.report import write_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(method, ratio, task, score, n=2, context_length=1000, depth=None, **extra):
    row = dict(method=method, compression_ratio=ratio, kept_fraction=1.0 - ratio, task=task,
               context_length=context_length, score=score, n=n, **extra)
    if depth is not None:
        row["depth"] = depth
    return row


@pytest.fixture
def rows():
    out = []
    # full: niah 1.0 everywhere, vt 0.8 -> average 0.9
    # echokv at 0.5: niah 0.75 (mean of 1.0 and 0.5, equal n), vt 0.6 -> average 0.675 -> 75.0% of full
    for method, ratio, niah_scores, vt in [("full", 0.0, (1.0, 1.0), 0.8), ("echokv", 0.5, (1.0, 0.5), 0.6)]:
        for depth, s in zip((0.0, 1.0), niah_scores):
            for length in (1000, 2000):
                out.append(_row(method, ratio, "niah_single_1", s, context_length=length, depth=depth))
        out.append(_row(method, ratio, "vt", vt))
    out.append(_row("snapkv", 0.5, "niah_single_1", None, n=0, error="RuntimeError: out of | memory"))
    return out


def test_means(rows):
    echokv = [r for r in rows if r["method"] == "echokv"]
    assert task_means(echokv) == {"niah_single_1": pytest.approx(0.75), "vt": pytest.approx(0.6)}
    assert average_score(echokv) == pytest.approx(0.675)
    # Weighted by n: (1.0 * 3 + 0.0 * 1) / 4
    assert average_score([_row("m", 0, "t", 1.0, n=3), _row("m", 0, "t", 0.0, n=1)]) == pytest.approx(0.75)


def test_write_results(rows, tmp_path):
    written = write_results(rows, tmp_path / "out", "ruler")
    out = tmp_path / "out"
    assert json.loads((out / "results.json").read_text()) == rows
    report = (out / "report.md").read_text()
    assert "## ruler" in report
    assert "| method | compression | kept | n | niah_single_1 | vt | average | vs full |" in report

    def pm(p, n):  # score and the half-width of its Wilson interval, in points
        low, high = wilson(p, n)
        return f"{100 * p:.1f} ±{100 * (high - low) / 2:.1f}"

    # niah: 4 rows of n = 2 (8 samples), vt: n = 2, average over all 10
    assert f"| full | 0 | 1.000 | 10 | {pm(1.0, 8)} | {pm(0.8, 2)} | {pm(0.9, 10)} | 100.0% |" in report
    assert f"| echokv | 0.5 | 0.500 | 10 | {pm(0.75, 8)} | {pm(0.6, 2)} | {pm(0.675, 10)} | 75.0% |" in report
    assert "| full | 0 | 1.000 | 10 | 100.0 ±16.2 |" in report  # hand-computed: Wilson (0.676, 1.0) at n = 8
    assert "half-width of its 95% Wilson interval" in report
    # The failed method shows its error (pipes escaped) instead of numbers.
    snap = next(line for line in report.splitlines() if line.startswith("| snapkv"))
    assert "error: RuntimeError: out of \\| memory" in snap and "%" not in snap
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "pareto.png" in pngs
    assert {"ruler_niah_full_0.png", "ruler_niah_echokv_0.5.png"} <= set(pngs)
    for name in pngs:
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
        assert f"]({name})" in report  # linked from the report
    assert set(written) >= {"results", "report"}


def test_report_without_niah_depths_and_with_suites(tmp_path):
    rows = [_row("full", 0.0, "hotpotqa", 0.5, suite="longbench"), _row("echokv", 0.75, "hotpotqa", 0.25,
                                                                        suite="longbench")]
    write_results(rows, tmp_path, "main")
    report = (tmp_path / "report.md").read_text()
    assert "## longbench" in report and "| echokv | 0.75 | 0.250 | 2 | 25.0 ±" in report and "| 50.0% |" in report
    assert [p.name for p in tmp_path.glob("*.png")] == ["pareto.png"]


def test_rows_need_fields(tmp_path):
    with pytest.raises(ValueError, match="lacks kept_fraction"):
        write_results([{"method": "full", "compression_ratio": 0, "task": "t", "context_length": 1,
                        "score": 1.0, "n": 1}], tmp_path, "s")


def test_plots_directly(rows, tmp_path):
    assert plot_score_vs_kept(rows, tmp_path / "a.png").read_bytes().startswith(PNG_MAGIC)
    heatmap = plot_niah_heatmap(rows, tmp_path / "sub" / "b.png", "echokv")
    assert heatmap.read_bytes().startswith(PNG_MAGIC)


def test_frontier_points_and_pareto_plot(rows, tmp_path):
    """pareto.png: one line per method against the measured kept fraction, with Wilson error bars."""
    points = frontier_points(rows)
    assert set(points) == {"full", "echokv"}  # the failed snapkv has no point
    (echo,) = points["echokv"]
    assert echo["kept"] == pytest.approx(0.5) and echo["n"] == 10 and echo["score"] == pytest.approx(0.675)
    assert (echo["ci_low"], echo["ci_high"]) == pytest.approx(wilson(0.675, 10))
    frontier = rows + [{**_row("quant", 0.75, "niah_single_1", 0.5, n=4), "kept_fraction": 0.28},
                       {**_row("quant", 0.5, "niah_single_1", 1.0, n=4), "kept_fraction": 0.53}]
    points = frontier_points(frontier)
    assert [p["ratio"] for p in points["quant"]] == [0.75, 0.5]  # sorted by kept fraction
    png = plot_score_vs_kept(frontier, tmp_path / "pareto.png")
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_skipped_rows_say_why(tmp_path):
    rows = [_row("full", 0.0, "niah_single_2", 1.0),
            {"method": "quant", "compression_ratio": 0.99, "task": "niah_single_2", "context_length": 512, "n": 0,
             "skipped": "skipped: cannot reach ratio 0.99"}]
    write_results(rows, tmp_path, "quick")
    line = next(x for x in (tmp_path / "report.md").read_text().splitlines() if x.startswith("| quant"))
    assert "cannot reach ratio 0.99" in line
