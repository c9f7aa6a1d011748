"""Live curves: a filtered series chooser beside one plot per group of series, each on its own
scale, so a validity near 1 is never drawn on the axis of a k-NN entropy of -150.

Groups are per metric (``mesa/beta=0.9/validity`` and ``mesa/beta=0.5/validity`` share a plot)
or, with ``g``, per beta; when several jobs are drawn (pinned runs on the run screen, the compare
screen) each plot holds one series and a line per job, in the job's colour, which stays the same
on every screen. Only groups with points get a plot. Series are downsampled to the plot's width
(the minimum and maximum of the steps each cell covers) and a plot is redrawn only when its own
data or choice changed, so streaming never floods the event loop.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, Vertical
from textual.reactive import reactive
from textual.widgets import Input, SelectionList, Static
from textual_plot import HiResMode, PlotWidget

from engine.report.collect import BETA_KEY
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
    "repair/loss",
)
GROUPINGS = ("metric", "beta")
PANEL_ROWS = 9  # a plot's least height: its title, 5 rows of curve and the step axis
TWO_COLUMNS_FROM = 110  # plots side by side from this width of the plot area


def shown_by_default(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in DEFAULT_SERIES)


def short_key(key: str) -> str:
    """``mesa/beta=0.9/hinge`` -> ``β=0.9 hinge``: fits the narrow chooser."""
    m = BETA_KEY.match(key)
    return f"β={m['beta']} {m['name']}" if m else key


def group_of(key: str, grouping: str) -> str:
    """The plot a series goes to: its metric name (``validity``, ``loss``, ``asr``: one scale)
    or its beta (``β=0.9``; series without a beta by stage)."""
    m = BETA_KEY.match(key)
    if grouping == "beta":
        return f"β={m['beta']}" if m else key.split("/", 1)[0]
    return m["name"] if m else key.rsplit("/", 1)[-1]


def line_label(key: str, group: str) -> str:
    """A line's name in its plot's legend, without the plot's own name: ``β=0.9`` in the hinge
    plot, ``train`` for train/loss in the loss plot, ``validity`` in the β=0.9 plot."""
    words = [w for w in short_key(key).replace("/", " ").split() if w != group]
    return " ".join(words) or short_key(key)


def matches(key: str, pattern: str) -> bool:
    """The chooser's filter: a glob (``*validity``, ``mesa/beta=0.9/*``) or else a substring of
    the key or of its short form, in any case."""
    pattern = pattern.strip().lower()
    if not pattern:
        return True
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(key.lower(), pattern)
    return pattern in key.lower() or pattern in short_key(key).lower()


@dataclass(frozen=True)
class Curves:
    """One job's series to draw: the run's own, a pinned run's, or one of compare's."""

    job_id: int
    label: str
    series: SeriesSet
    colour: str


def make_plot(id: str | None = None) -> PlotWidget:
    return CompactPlot(id=id, allow_pan_and_zoom=True)


class CompactPlot(PlotWidget):
    """A plot with thin margins, so two fit one above the other at 80x24."""

    margin_top = reactive(0)
    margin_bottom = reactive(2)
    margin_left = reactive(7)


def draw(plot: PlotWidget, lines: Sequence[tuple[str, object, object, str]]) -> None:
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


class CurvePanel(Vertical):
    """One group's plot under a title line that is also its legend."""

    def __init__(self, group: str) -> None:
        super().__init__(classes="curve-panel")
        self.group = group
        self.drawn: object = None
        self.lines: list[tuple[str, object, object, str]] = []
        self.pending: tuple[list, object, str] | None = None

    def compose(self) -> ComposeResult:
        yield Static(self.group, classes="curve-title")
        yield make_plot()

    def show(self, lines: list[tuple[str, object, object, str]], state: object, title: str) -> None:
        """Draw these lines unless this very state is already on screen at this size (a plot
        not mounted yet draws them when it is; one removed meanwhile draws nothing)."""
        self.pending = (lines, state, title)
        if not self.is_attached or not self.children:
            return
        plot = self.query_one(PlotWidget)
        state = (state, title, plot.size)
        if state == self.drawn:
            return
        self.drawn, self.lines = state, lines
        legend = Text(f"{title} ", style="bold", no_wrap=True, overflow="ellipsis")
        for label, _x, _y, colour in lines:
            legend.append(f"■ {label} ", style=colour)
        self.query_one(".curve-title", Static).update(legend)
        draw(plot, lines)

    def on_mount(self) -> None:
        self.call_after_refresh(self._show_pending)

    def on_resize(self) -> None:
        """Downsampled to the old size: draw again at the new one."""
        self._show_pending()

    def _show_pending(self) -> None:
        if self.pending is not None:
            self.show(*self.pending)


class CurvesPanel(Horizontal):
    """The chooser (a filter over the series, then space toggles one; enter in the filter
    chooses exactly the series it matches) and the plots of one or several jobs."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.key_colours: dict[str, str] = {}
        self.grouping = GROUPINGS[0]
        self.drawn: tuple[object, ...] = ()
        self.sources: tuple[Curves, ...] = ()
        self._selected: set[str] = set()  # chosen series, listed or not (the filter only hides)
        self.page = 0  # the plots that fit are a page; "," and "." turn pages (no scroll bar)
        self.pages = 1

    def compose(self) -> ComposeResult:
        with Vertical(classes="series-side"):
            yield Input(placeholder="/ filter series", id="series-filter", compact=True)
            yield SelectionList[str](id="series")
        yield Grid(id="panels", classes="plots")

    # -- the chooser ------------------------------------------------------------------------

    def add_keys(self, keys: Sequence[str]) -> None:
        """New series join the chooser (shown if the filter matches) with a colour of their own."""
        new = [k for k in keys if k not in self.key_colours]
        for key in new:
            self.key_colours[key] = PALETTE[len(self.key_colours) % len(PALETTE)]
            if shown_by_default(key):
                self._selected.add(key)
        pattern = self.query_one("#series-filter", Input).value
        chooser = self.query_one("#series", SelectionList)
        for key in new:
            if matches(key, pattern):
                chooser.add_option(self._option(key, key in self._selected))

    def _option(self, key: str, selected: bool) -> tuple[Text, str, bool]:
        return (Text(short_key(key), style=self.key_colours[key]), key, selected)

    def _chosen(self) -> set[str]:
        return self._selected

    def selected(self) -> frozenset[str]:
        return frozenset(self._selected)

    @on(SelectionList.SelectedChanged, "#series")
    def _toggled(self) -> None:
        chooser = self.query_one("#series", SelectionList)
        listed = {chooser.get_option_at_index(i).value for i in range(chooser.option_count)}
        chosen = self._chosen()
        chosen -= listed - set(chooser.selected)
        chosen |= set(chooser.selected)

    @on(Input.Changed, "#series-filter")
    def _filtered(self, event: Input.Changed) -> None:
        self._relist(event.value)

    @on(Input.Submitted, "#series-filter")
    def _choose_matching(self, event: Input.Submitted) -> None:
        """Enter: exactly the listed series are chosen (all of them, when the filter is empty)."""
        chosen = self._chosen()
        chosen.clear()
        chosen.update(k for k in self.key_colours if matches(k, event.value))
        self._relist(event.value)
        self.query_one("#series", SelectionList).focus()

    def _relist(self, pattern: str) -> None:
        chooser = self.query_one("#series", SelectionList)
        chosen = self._chosen()
        with chooser.prevent(SelectionList.SelectedChanged):
            chooser.clear_options()
            chooser.add_options(
                [self._option(k, k in chosen) for k in self.key_colours if matches(k, pattern)]
            )
        self.redraw(self.sources, force=True)

    def action_regroup(self) -> None:
        self.grouping = GROUPINGS[(GROUPINGS.index(self.grouping) + 1) % len(GROUPINGS)]
        self.page = 0
        self.redraw(self.sources, force=True)

    def turn_page(self, delta: int) -> None:
        self.page = (self.page + delta) % self.pages
        self.redraw(self.sources, force=True)

    # -- the plots --------------------------------------------------------------------------

    def drawn_versions(self) -> dict[int, int]:
        """Job id -> the version of its series last drawn."""
        return {job_id: version for job_id, version, _ in (self.drawn[0] if self.drawn else ())}

    def panels(self) -> dict[str, CurvePanel]:
        """The plots on screen by group."""
        return {p.group: p for p in self.query(CurvePanel)}

    def redraw(self, sources: Sequence[Curves], force: bool = False) -> bool:
        """Draw when the data, the jobs or the choice changed; returns whether it drew."""
        self.sources = tuple(sources)
        for curves in sources:
            if not self.key_colours.keys() >= curves.series.series.keys():
                self.add_keys(curves.series.keys())
        state = (
            tuple((c.job_id, c.series.version, c.colour) for c in sources),
            self.selected(),
            self.grouping,
        )
        if not force and state == self.drawn:
            return False
        self.drawn = state
        self._place(self._groups(sources))
        return True

    def _groups(self, sources: Sequence[Curves]) -> dict[str, list[tuple[Curves, str]]]:
        """Group -> the (job, key) lines it draws; with several jobs, one key per group."""
        several = len(sources) > 1
        groups: dict[str, list[tuple[Curves, str]]] = {}
        for key in sorted(self._chosen()):
            for curves in sources:
                s = curves.series.series.get(key)
                if s is None or not s.n:
                    continue
                group = short_key(key) if several else group_of(key, self.grouping)
                groups.setdefault(group, []).append((curves, key))
        # The series most jobs share first: what a comparison is about.
        ranked = sorted(groups, key=lambda g: -len({c.job_id for c, _ in groups[g]}))
        return {g: groups[g] for g in ranked}

    def _fit(self) -> tuple[int, int]:
        """(columns, rows) of plots that fit the area at ``PANEL_ROWS`` or more rows each."""
        area = self.query_one("#panels", Grid)
        columns = 2 if area.size.width >= TWO_COLUMNS_FROM else 1
        return columns, max(1, (area.size.height or PANEL_ROWS) // PANEL_ROWS)

    def _place(self, groups: dict[str, list[tuple[Curves, str]]]) -> None:
        """A plot per group that has points, as many as fit (a page), each drawn when its lines
        moved; the other pages' plots are not mounted at all."""
        columns, rows = self._fit()
        per_page = columns * rows
        self.pages = max(1, -(-len(groups) // per_page))
        self.page = min(self.page, self.pages - 1)
        order = list(groups)[self.page * per_page : (self.page + 1) * per_page]
        area = self.query_one("#panels", Grid)
        shown = list(area.query_children(CurvePanel))
        if [p.group for p in shown] != order:  # other plots: mount them anew, in order
            area.remove_children()
            shown = [CurvePanel(group) for group in order]
            area.mount_all(shown)
        panels = {p.group: p for p in shown}
        used = max(1, -(-len(order) // columns))
        area.styles.grid_size_columns = columns if len(order) > 1 else 1
        area.styles.grid_rows = str(max(PANEL_ROWS, (area.size.height or PANEL_ROWS) // used))
        note = f"plots {self.page + 1}/{self.pages} (, .) · " if self.pages > 1 else ""
        several = len({c.job_id for lines in groups.values() for c, _ in lines}) > 1
        for group in order:
            lines = [
                (
                    c.label if several else line_label(key, group),
                    c.series.series[key].steps,
                    c.series.series[key].values,
                    c.colour if several else self.key_colours[key],
                )
                for c, key in groups[group]
            ]
            state = tuple((c.job_id, key, c.series.version) for c, key in groups[group])
            title = note + group if group == order[0] else group
            panels[group].show(lines, (state, several), title)

    def on_resize(self) -> None:
        if self.sources:
            self.redraw(self.sources, force=True)
