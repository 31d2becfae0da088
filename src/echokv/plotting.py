"""Figures drawn on matplotlib's Agg canvas directly: no pyplot, no global backend, files only."""

from __future__ import annotations

from pathlib import Path


def figure(figsize: tuple[float, float], dpi: float | None = None):
    """A new matplotlib Figure with its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save(fig, path, dpi: float | str = "figure") -> Path:
    """Lay out ``fig`` and write it to ``path`` (PNG by its suffix); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path
