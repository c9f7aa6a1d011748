"""Compare: pick jobs (they are the pinned runs, overlaid on every run screen too) and see their
series side by side, one plot per series with a line per job, in the curves widget of the run
screen."""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Footer, SelectionList, Static
from textual.worker import Worker, get_current_worker

from mesa_tui.messages import JobsPolled, MetricsBatch, MetricsHistory
from mesa_tui.screens.base import SourceScreen, read_series
from mesa_tui.source import JobQuery
from mesa_tui.widgets.curves import Curves, CurvesPanel
from mesa_tui.widgets.series import SeriesSet

TITLE = "compare · space picks jobs (pinned everywhere), / filters series, g groups"


class CompareScreen(SourceScreen):
    BINDINGS = [
        Binding("escape", "app.switch_mode('jobs')", "jobs"),
        Binding("slash", "filter_series", "filter series"),
        Binding("g", "regroup", "group by", show=False),
        Binding("full_stop", "plots(1)", "next plots", show=False),
        Binding("comma", "plots(-1)", "previous plots", show=False),
    ]

    def __init__(self) -> None:
        super().__init__(id="compare")
        self.series: dict[int, SeriesSet] = {}
        self.labels: dict[int, str] = {}
        self.reader: Worker | None = None

    def compose(self) -> ComposeResult:
        yield Static(TITLE, classes="title")
        with Horizontal():
            yield SelectionList[int](id="compare-jobs")
            yield CurvesPanel(id="compare-curves")
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
        with chooser.prevent(SelectionList.SelectedChanged):
            for row in sorted(message.page.rows, key=lambda r: r.id, reverse=True):
                if row.id not in self.labels:
                    self.labels[row.id] = f"{row.id} {row.method or row.kind}"
                    label = f"{row.id} {row.kind} {row.method or ''} {row.trigger or ''}"
                    chooser.add_option((label, row.id))
            # The pins chosen on a run screen are chosen here (and the other way round).
            chooser.deselect_all()
            for job_id in self.mesa.pins:
                if job_id in self.labels:
                    chooser.select(job_id)
        self.poll()

    def chosen(self) -> list[int]:
        return [j for j in self.mesa.pins if j in self.labels]

    def poll(self) -> None:
        chosen = self.chosen()
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
        source, worker = self.mesa.source, get_current_worker()
        for job_id, cursor in cursors.items():
            runs = source.job_detail(job_id).run_ids
            read_series(self, source, job_id, runs, cursor, cursor == 0 and bool(runs), worker)

    def on_metrics_history(self, message: MetricsHistory) -> None:
        self.series.setdefault(message.job_id, SeriesSet()).load_history(message.history)

    def on_metrics_batch(self, message: MetricsBatch) -> None:
        self.series.setdefault(message.job_id, SeriesSet()).add_columns(message.columns)

    @on(SelectionList.SelectedChanged, "#compare-jobs")
    def _jobs_chosen(self) -> None:
        picked = self.query_one("#compare-jobs", SelectionList).selected
        for job_id in set(self.mesa.pins) ^ set(picked):
            self.mesa.toggle_pin(job_id)
        self.poll()
        self.redraw()

    def action_filter_series(self) -> None:
        self.query_one("#series-filter").focus()

    def action_plots(self, delta: int) -> None:
        self.query_one(CurvesPanel).turn_page(delta)

    def action_regroup(self) -> None:
        self.query_one(CurvesPanel).action_regroup()

    def redraw(self) -> None:
        if not self.is_current:
            return
        self.query_one(CurvesPanel).redraw(
            [
                Curves(j, self.labels[j], self.series[j], self.mesa.colour_of(j))
                for j in self.chosen()
                if j in self.series
            ]
        )
