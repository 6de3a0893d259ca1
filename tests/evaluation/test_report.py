"""The report's plot: honest axes (issue 19.19)."""

from __future__ import annotations

import matplotlib.pyplot as plt

from ptune.evaluation.metrics import METRIC_NAMES
from ptune.evaluation.report import plot_metrics


def test_plot_axes_start_at_zero_and_titles_give_the_spread(tmp_path, monkeypatch):
    """33.42 against 33.52 must not fill the axis as if it were a large change."""
    rows = [
        {"run": "run", "step": step, "checkpoint": str(tmp_path / "run" / f"checkpoint-{step}"),
         **dict.fromkeys(METRIC_NAMES, value)}
        for step, value in ((100, 33.42), (200, 33.52))
    ]  # fmt: skip
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at its axes
    plot_metrics(rows, tmp_path / "plot.png")
    (figure,) = figures
    panels = [axis for axis in figure.axes if axis.get_title()]
    assert len(panels) == 4
    for axis in panels:
        bottom, top = axis.get_ylim()
        assert bottom == 0 and top >= 33.52
        assert axis.get_title().endswith(": 33.42 to 33.52 (spread 0.10)")
