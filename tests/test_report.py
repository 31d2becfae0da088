"""results.json, report.md and figures (echokv.eval.report, echokv.eval.plots)."""

from __future__ import annotations

import json

import pytest

from echokv.eval.plots import average_score, plot_niah_heatmap, plot_score_vs_kept, task_means
from echokv.eval.report import write_results

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
    assert "| method | compression | kept | niah_single_1 | vt | average | vs full |" in report
    assert "| full | 0 | 1.00 | 100.0 | 80.0 | 90.0 | 100.0% |" in report
    assert "| echokv | 0.5 | 0.50 | 75.0 | 60.0 | 67.5 | 75.0% |" in report
    # The failed method shows its error (pipes escaped) instead of numbers.
    snap = next(line for line in report.splitlines() if line.startswith("| snapkv"))
    assert "error: RuntimeError: out of \\| memory" in snap and "%" not in snap
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "ruler_score_vs_kept.png" in pngs
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
    assert "## longbench" in report and "| echokv | 0.75 | 0.25 | 25.0 | 25.0 | 50.0% |" in report
    assert [p.name for p in tmp_path.glob("*.png")] == ["longbench_score_vs_kept.png"]


def test_rows_need_fields(tmp_path):
    with pytest.raises(ValueError, match="lacks kept_fraction"):
        write_results([{"method": "full", "compression_ratio": 0, "task": "t", "context_length": 1,
                        "score": 1.0, "n": 1}], tmp_path, "s")


def test_plots_directly(rows, tmp_path):
    assert plot_score_vs_kept(rows, tmp_path / "a.png").read_bytes().startswith(PNG_MAGIC)
    heatmap = plot_niah_heatmap(rows, tmp_path / "sub" / "b.png", "echokv")
    assert heatmap.read_bytes().startswith(PNG_MAGIC)
