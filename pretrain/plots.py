"""The report's PNG plots, drawn headless: matplotlib `Figure` objects rendered by its Agg canvas, never pyplot's
global state or a display (matplotlib's "embedding in a web application server" example does the same). Every run
keeps one colour in every panel, and every panel's x axis is the input tokens trained on, so runs of different
objectives, batch sizes and budgets line up; torchtitan and nanochat compare runs the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

FIG_SIZE = (10.0, 4.0)  # inches, width x height
DPI = 100  # pixels per inch: every PNG is 1000 x 400 pixels
MAX_RUNS_IN_LEGEND = 12  # more runs than that: the legend would cover the curves


@dataclass
class Curve:
    """One run's points in one panel: x = input tokens, y = the value; `index` picks the run's colour."""

    label: str
    index: int
    xs: list[float] = field(default_factory=list)
    ys: list[float] = field(default_factory=list)


@dataclass
class Panel:
    """One axes of a figure: a title, a y label and a curve per run (points only: validation is sparse)."""

    title: str
    ylabel: str
    curves: list[Curve]
    markers: bool = False
    log_y: bool = False
    percent: bool = False  # y values are fractions, shown as percentages


def draw(path: Path, panels: list[Panel]) -> Path:
    """Render `panels` side by side into the PNG `path` (FIG_SIZE at DPI); returns `path`."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    fig = Figure(figsize=FIG_SIZE, dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        for c in panel.curves:
            if c.xs:
                ax.plot(c.xs, c.ys, color=f"C{c.index % 10}", label=c.label, marker="o" if panel.markers else None,
                        markersize=3, linewidth=1.4)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("input tokens")
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        if panel.log_y and any(y > 0 for c in panel.curves for y in c.ys):
            ax.set_yscale("log")
        if panel.percent:
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        if not any(c.xs for c in panel.curves):
            ax.text(0.5, 0.5, "no records yet", ha="center", va="center", transform=ax.transAxes, color="grey")
        elif len(panel.curves) <= MAX_RUNS_IN_LEGEND:
            ax.legend(fontsize=7)
    fig.savefig(path, dpi=DPI)
    return path
