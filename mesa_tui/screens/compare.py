"""Compare: pick jobs and overlay one metric's curves."""

from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Select, SelectionList, Static
from textual.worker import Worker, get_current_worker

from mesa_tui.messages import JobsPolled, MetricsBatch, MetricsHistory
from mesa_tui.screens.base import SourceScreen
from mesa_tui.source import HISTORY_POINTS, JobQuery
from mesa_tui.widgets.curves import PALETTE, draw, make_plot
from mesa_tui.widgets.series import MetricColumns, SeriesSet

PAGE = 10_000


class CompareScreen(SourceScreen):
    BINDINGS = [
        Binding("escape", "app.switch_mode('jobs')", "jobs"),
        Binding("k", "focus_key", "metric"),
    ]

    def __init__(self) -> None:
        super().__init__(id="compare")
        self.series: dict[int, SeriesSet] = {}
        self.labels: dict[int, str] = {}
        self.reader: Worker | None = None
        self.drawn: tuple[object, ...] = ()

    def compose(self) -> ComposeResult:
        yield Static("compare · space picks jobs, k picks the metric", classes="title")
        with Horizontal():
            yield SelectionList[int](id="compare-jobs")
            with Vertical(classes="plots"):
                yield Select([], prompt="metric", id="compare-key")
                yield make_plot("compare-plot")
        yield Footer()

    def on_mount(self) -> None:
        self.read_jobs()
        self.set_interval(self.mesa.metrics_poll_s, self.poll)
        self.set_interval(self.mesa.redraw_s, self.redraw)

    def on_screen_resume(self) -> None:
        self.read_jobs()

    @work(
        thread=True, exclusive=True, exit_on_error=False, group="jobs", description="reading jobs"
    )
    def read_jobs(self) -> None:
        query = JobQuery()
        self.post_message(JobsPolled(self.mesa.source.jobs(query, None), query))

    def on_jobs_polled(self, message: JobsPolled) -> None:
        chooser = self.query_one("#compare-jobs", SelectionList)
        for row in sorted(message.page.rows, key=lambda r: r.id, reverse=True):
            if row.id in self.labels:
                continue
            label = f"{row.id} {row.kind} {row.trigger or ''} {row.status}"
            self.labels[row.id] = label
            chooser.add_option((label, row.id))

    def poll(self) -> None:
        chosen = tuple(self.query_one("#compare-jobs", SelectionList).selected)
        if not chosen or (self.reader is not None and not self.reader.is_finished):
            return
        cursors = {j: self.series.setdefault(j, SeriesSet()).cursor for j in chosen}
        self.reader = self.read_metrics(cursors)

    @work(
        thread=True,
        exclusive=True,
        exit_on_error=False,
        group="poll",
        description="reading metrics",
    )
    def read_metrics(self, cursors: dict[int, int]) -> None:
        source = self.mesa.source
        worker = get_current_worker()
        for job_id, cursor in cursors.items():
            runs = source.job_detail(job_id).run_ids
            if runs and cursor == 0:  # first read: the history downsampled, then new points
                history = source.metric_history(job_id, HISTORY_POINTS)
                self.post_message(MetricsHistory(job_id, history))
                cursor = history.cursor
            while runs and not worker.is_cancelled:
                points = source.metric_points(runs, cursor, PAGE)
                if points:
                    self.post_message(MetricsBatch(job_id, MetricColumns(points)))
                    cursor = points[-1].id
                if len(points) < PAGE:
                    break

    def on_metrics_history(self, message: MetricsHistory) -> None:
        series = self.series.setdefault(message.job_id, SeriesSet())
        if series.load_history(message.history):
            self._update_keys()

    def on_metrics_batch(self, message: MetricsBatch) -> None:
        series = self.series.setdefault(message.job_id, SeriesSet())
        if series.add_columns(message.columns):
            self._update_keys()

    def _update_keys(self) -> None:
        select = self.query_one("#compare-key", Select)
        keys = sorted({k for s in self.series.values() for k in s.series})
        if keys != getattr(self, "_keys", None):
            self._keys = keys
            current = select.value
            select.set_options([(k, k) for k in keys])
            if current in keys:
                select.value = current
            else:
                preferred = [k for k in ("eval/asr", "train/loss", "repair/asr") if k in keys]
                if preferred or keys:
                    select.value = (preferred or keys)[0]

    @on(SelectionList.SelectedChanged, "#compare-jobs")
    def _jobs_chosen(self) -> None:
        self.poll()
        self.redraw()

    @on(Select.Changed, "#compare-key")
    def _key_chosen(self) -> None:
        self.redraw()

    def action_focus_key(self) -> None:
        self.query_one("#compare-key", Select).focus()

    def redraw(self) -> None:
        if not self.is_current:
            return
        chosen = list(self.query_one("#compare-jobs", SelectionList).selected)
        key = self.query_one("#compare-key", Select).value
        state = (
            tuple(chosen),
            key,
            tuple(self.series[j].version for j in chosen if j in self.series),
        )
        if state == self.drawn:
            return
        self.drawn = state
        lines = []
        for i, job_id in enumerate(chosen):
            s = self.series.get(job_id)
            data = s.series.get(str(key)) if s else None
            if data is not None and data.n:
                lines.append(
                    (
                        self.labels.get(job_id, str(job_id)),
                        data.steps,
                        data.values,
                        PALETTE[i % len(PALETTE)],
                    )
                )
        plot = self.query_one("#compare-plot")
        draw(plot, lines)  # type: ignore[arg-type]
        legend = Text()
        for i, (label, *_rest) in enumerate(lines):
            legend.append(f"■ {label}  ", style=PALETTE[i % len(PALETTE)])
        self.query_one(".title", Static).update(
            legend if lines else "compare · space picks jobs, k picks the metric"
        )
