"""Live curves: a series chooser beside two plots (training signals, and per-epoch evaluation).

Series are drawn from ``SeriesSet`` arrays, downsampled to the plot's width (the minimum and the
maximum of the steps each cell covers, in two braille columns), and redrawn on a timer only when
something changed, so streaming never floods the event loop.
"""

from __future__ import annotations

import fnmatch

import numpy as np
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.reactive import reactive
from textual.widgets import SelectionList
from textual_plot import HiResMode, PlotWidget

from mesa_tui.source import BETA_KEY
from mesa_tui.widgets.series import SeriesSet, downsample

PALETTE = (
    "cyan",
    "magenta",
    "yellow",
    "green",
    "red",
    "blue",
    "bright_cyan",
    "bright_magenta",
    "orange1",
    "purple",
)
DEFAULT_SERIES = (
    "train/loss",
    "*/hinge",
    "*/mine",
    "eval/acc_clean",
    "eval/asr",
    "repair/asr",
    "repair/acc_clean",
)


def is_eval_key(key: str) -> bool:
    """Per-epoch evaluation series go to the lower plot (their scale is 0..1)."""
    return key.startswith(("eval/", "repair/")) or key.endswith(("/acc", "/asr", "/validity"))


def shown_by_default(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in DEFAULT_SERIES)


class CompactPlot(PlotWidget):
    """A plot with thin margins, so two fit one above the other at 80x24."""

    margin_top = reactive(0)
    margin_bottom = reactive(2)
    margin_left = reactive(7)


def short_key(key: str) -> str:
    """``mesa/beta=0.9/hinge`` -> ``β=0.9 hinge``: fits the narrow chooser."""
    m = BETA_KEY.match(key)
    return f"β={m['beta']} {m['name']}" if m else key


def make_plot(id: str) -> PlotWidget:
    return CompactPlot(id=id, allow_pan_and_zoom=True)


def draw(plot: PlotWidget, lines: list[tuple[str, object, object, str]]) -> None:
    """Replace a plot's lines with ``(label, steps, values, colour)``, downsampled to its width."""
    buckets = max(8, plot.size.width - plot.margin_left)  # min and max per cell: 2 braille columns
    plot.clear()
    for label, x, y, colour in lines:
        xs, ys = downsample(x, y, buckets)  # type: ignore[arg-type]
        finite = np.isfinite(ys)  # NaN and infinities have no place on a plot
        if not finite.all():
            xs, ys = xs[finite], ys[finite]
        if len(xs):
            plot.plot(xs, ys, line_style=colour, hires_mode=HiResMode.BRAILLE, label=label)


class CurvesPanel(Horizontal):
    """Series chooser (space toggles) and the two plots of one job."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.colours: dict[str, str] = {}
        self.drawn = (-1, frozenset())

    def compose(self) -> ComposeResult:
        yield SelectionList[str](id="series")
        with Vertical(classes="plots"):
            yield make_plot("loss-plot")
            yield make_plot("eval-plot")

    def add_keys(self, keys: list[str]) -> None:
        chooser = self.query_one("#series", SelectionList)
        known = set(self.colours)
        for key in keys:
            if key in known:
                continue
            colour = PALETTE[len(self.colours) % len(PALETTE)]
            self.colours[key] = colour
            chooser.add_option((Text(short_key(key), style=colour), key, shown_by_default(key)))

    def selected(self) -> frozenset[str]:
        return frozenset(self.query_one("#series", SelectionList).selected)

    def redraw(self, series: SeriesSet, force: bool = False) -> bool:
        """Draw when the data or the choice changed; returns whether it drew."""
        state = (series.version, self.selected())
        if not force and state == self.drawn:
            return False
        self.add_keys(series.keys())
        chosen = sorted(self.selected())
        upper, lower = [], []
        for key in chosen:
            s = series.series.get(key)
            if s is None or not s.n:
                continue
            (lower if is_eval_key(key) else upper).append(
                (key, s.steps, s.values, self.colours[key])
            )
        draw(self.query_one("#loss-plot", PlotWidget), upper)
        draw(self.query_one("#eval-plot", PlotWidget), lower)
        self.drawn = (series.version, self.selected())
        return True
