"""The run screen of one job: curves, trigger samples, embedding, parameters, log, artifacts."""

from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import (
    DataTable,
    Footer,
    RichLog,
    SelectionList,
    Static,
    TabbedContent,
    TabPane,
)
from textual.worker import Worker, get_current_worker
from textual_plot import PlotWidget

from engine.report.collect import BETA_KEY
from mesa_tui.messages import (
    JobDetailLoaded,
    LogBatch,
    MetricsBatch,
    MetricsHistory,
    RequestDone,
    SamplesLoaded,
)
from mesa_tui.screens.base import SourceScreen, read_series
from mesa_tui.screens.modals import ConfirmModal
from mesa_tui.source import (
    JobView,
    pca_2d,
    read_trigger_samples,
    search_dirs,
)
from mesa_tui.widgets.curves import PALETTE, Curves, CurvesPanel, make_plot
from mesa_tui.widgets.format import duration, number, size, status_text
from mesa_tui.widgets.position_map import PositionMap
from mesa_tui.widgets.series import SeriesSet
from mesa_tui.widgets.trigger_grid import TriggerGrid
from store.entities import FINISHED, RETRYABLE

TABS = ("curves", "triggers", "embedding", "params", "log", "artifacts")
SAMPLES_EVERY = 4  # polls between looks at the samples on disk
DETAIL_EVERY = 2  # polls between reads of the job's status, runs and latest values
CURVE_SKIP = ("hinge", "mine", "loss")  # per-beta training signals live on the curves tab


def stats_rows(latest: dict[str, float]) -> tuple[list[str], list[tuple[str, dict[str, float]]]]:
    """Per-beta search statistics from the latest metrics: betas, and rows of (name, by beta)."""
    table: dict[str, dict[str, float]] = {}
    betas: set[str] = set()
    for key, value in latest.items():
        m = BETA_KEY.match(key)
        if m is None or m["stage"] != "mesa" or m["name"] in CURVE_SKIP:
            continue
        betas.add(m["beta"])
        table.setdefault(m["name"], {})[m["beta"]] = value
    ordered = sorted(
        betas, key=lambda b: float(b) if b.replace(".", "", 1).isdigit() else -1, reverse=True
    )
    return ordered, sorted(table.items())


class RunScreen(SourceScreen):
    BINDINGS = [
        Binding("escape,backspace", "back", "back"),
        Binding("1", "tab('curves')", "curves", show=False),
        Binding("2", "tab('triggers')", "triggers", show=False),
        Binding("3", "tab('embedding')", "embedding", show=False),
        Binding("4", "tab('params')", "params", show=False),
        Binding("5", "tab('log')", "log", show=False),
        Binding("6", "tab('artifacts')", "artifacts", show=False),
        Binding("right_square_bracket", "next_tab", "next tab"),
        Binding("left_square_bracket", "previous_tab", "prev tab", show=False),
        Binding("c", "cancel", "cancel"),
        Binding("r", "retry", "retry"),
        Binding("x", "export", "export report", show=False),
        Binding("p", "pin", "pin"),
        Binding("g", "regroup", "group by", show=False),
        Binding("slash", "filter_series", "filter series", show=False),
        Binding("full_stop", "plots(1)", "next plots", show=False),
        Binding("comma", "plots(-1)", "previous plots", show=False),
    ]

    def __init__(self, job_id: int) -> None:
        super().__init__(classes="run")
        self.job_id = job_id
        self.detail: JobView | None = None
        self.series = SeriesSet()
        self.history_asked = False  # the history is read once, downsampled; then only new points
        self.pinned: dict[int, SeriesSet] = {}  # the pinned runs overlaid on the curves
        self.pin_runs: dict[int, tuple[int, ...]] = {}  # written by the (one) reading worker
        self.log_cursor = 0
        self.samples_stamp = 0.0
        self.polls = 0
        self.reader: Worker | None = None
        self.title_text: Text | None = None
        self.shown_tables: dict[str, tuple] = {}

    def compose(self) -> ComposeResult:
        yield Static(f"job {self.job_id} · loading…", id="run-title", classes="title")
        with TabbedContent(id="tabs"):
            with TabPane("Curves", id="curves"):
                yield CurvesPanel(id="curves-panel")
            with TabPane("Triggers", id="triggers"), VerticalScroll():
                yield TriggerGrid(id="trigger-grid")
                yield PositionMap(id="position-map")
                yield DataTable(id="trigger-stats", cursor_type="row", zebra_stripes=True)
            with TabPane("Embedding", id="embedding"):
                yield Static(
                    "PCA of the sampled triggers, one colour per beta",
                    id="embedding-note",
                    classes="subtle",
                )
                yield make_plot("embedding-plot")
            with TabPane("Params", id="params"):
                yield DataTable(id="params-table", cursor_type="row", zebra_stripes=True)
            with TabPane("Log", id="log"):
                yield RichLog(id="log-view", max_lines=5000, wrap=False, markup=False)
            with TabPane("Artifacts", id="artifacts"):
                yield DataTable(id="artifacts-table", cursor_type="row", zebra_stripes=True)
                yield Static("", id="artifact-path", classes="subtle")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#params-table", DataTable).add_columns("setting", "value")
        self.query_one("#artifacts-table", DataTable).add_columns("kind", "size", "sha256", "path")
        self.set_interval(self.mesa.metrics_poll_s, self.poll)
        self.set_interval(self.mesa.redraw_s, self.redraw)
        self.poll()

    # -- reading ----------------------------------------------------------------------------

    def poll(self) -> None:
        if self.reader is not None and not self.reader.is_finished:
            return  # the previous read is still going; its cursor work is not lost
        want_samples = self.polls % SAMPLES_EVERY == 0
        self.polls += 1
        want_history, self.history_asked = not self.history_asked, True
        for job_id in set(self.pinned) - set(self.mesa.pins):
            del self.pinned[job_id]
        pins = {
            job_id: self.pinned.setdefault(job_id, SeriesSet()).cursor
            for job_id in self.mesa.pins
            if job_id != self.job_id
        }
        self.reader = self.read_run(
            self.series.cursor,
            self.log_cursor,
            self.samples_stamp if want_samples else None,
            self.polls % DETAIL_EVERY == 1 or self.detail is None,
            want_history,
            pins,
        )

    @work(
        thread=True,
        exclusive=True,
        exit_on_error=False,
        group="poll",
        description="reading the run",
    )
    def read_run(
        self,
        metric_cursor: int,
        log_cursor: int,
        samples_stamp: float | None,
        with_detail: bool,
        with_history: bool = False,
        pins: dict[int, int] | None = None,
    ) -> None:
        source = self.mesa.source
        worker = get_current_worker()
        if with_detail or self.detail is None:
            detail = source.job_detail(self.job_id)
            self.post_message(JobDetailLoaded(detail))
        else:
            detail = self.detail  # status and runs change slowly; metrics are read every poll
        self.read_pins(pins or {}, with_detail)
        runs = detail.run_ids
        if not runs:
            return
        read_series(self, source, self.job_id, runs, metric_cursor, with_history, worker)
        lines = source.logs(runs, log_cursor)
        if lines:
            self.post_message(LogBatch(self.job_id, lines))
        if samples_stamp is not None:
            samples = read_trigger_samples(search_dirs(detail), samples_stamp)
            if samples is not None:
                self.post_message(SamplesLoaded(self.job_id, samples, pca_2d(samples.by_beta)))

    def read_pins(self, pins: dict[int, int], with_detail: bool) -> None:
        """The pinned runs' series (in the reading worker): a history at a pin's first read; a
        pinned job deleted meanwhile is skipped, not an error."""
        from mesa_tui.source import SourceError

        source, worker = self.mesa.source, get_current_worker()
        for job_id, cursor in pins.items():
            if with_detail or job_id not in self.pin_runs:
                try:
                    self.pin_runs[job_id] = source.job_detail(job_id).run_ids
                except (SourceError, LookupError):
                    continue
            runs = self.pin_runs[job_id]
            read_series(self, source, job_id, runs, cursor, cursor == 0 and bool(runs), worker)

    def on_job_detail_loaded(self, message: JobDetailLoaded) -> None:
        self.detail = message.detail
        self.show_title(message.detail)
        self.show_params(message.detail)
        self.show_artifacts(message.detail)
        self.show_stats(message.detail)

    def fill(self, table_id: str, columns: tuple[str, ...] | None, rows: list[tuple]) -> None:
        """Refill a table only when its content changed: polls repeat, frames cost."""
        if self.shown_tables.get(table_id) == (columns, rows):
            return
        self.shown_tables[table_id] = (columns, rows)
        table = self.query_one(f"#{table_id}", DataTable)
        table.clear(columns=columns is not None)
        if columns is not None:
            table.add_columns(*columns)
        for row in rows:
            table.add_row(*row)

    def _series_of(self, job_id: int) -> SeriesSet | None:
        return self.series if job_id == self.job_id else self.pinned.get(job_id)

    def on_metrics_history(self, message: MetricsHistory) -> None:
        if (series := self._series_of(message.job_id)) is not None:
            series.load_history(message.history)

    def on_metrics_batch(self, message: MetricsBatch) -> None:
        if (series := self._series_of(message.job_id)) is not None:
            series.add_columns(message.columns)

    def on_log_batch(self, message: LogBatch) -> None:
        log = self.query_one("#log-view", RichLog)
        for line in message.lines:
            if line.id <= self.log_cursor:
                continue
            style = {"error": "bold red", "warning": "yellow"}.get(line.level, "")
            log.write(Text(f"{line.time:%H:%M:%S} {line.message}", style=style))
            self.log_cursor = line.id

    def on_samples_loaded(self, message: SamplesLoaded) -> None:
        self.samples_stamp = message.samples.stamp
        self.query_one(TriggerGrid).show(message.samples.by_beta, message.samples.original)
        self.query_one(PositionMap).show(message.samples.positions, message.samples.landing)
        plot = self.query_one("#embedding-plot", PlotWidget)
        plot.clear()
        for i, (beta, xy) in enumerate(sorted(message.embedding.items(), reverse=True)):
            plot.scatter(
                xy[:, 0],
                xy[:, 1],
                marker="•",
                marker_style=PALETTE[i % len(PALETTE)],
                label=f"β={beta}",
            )
        plot.show_legend(is_visible=bool(message.embedding))

    # -- showing ----------------------------------------------------------------------------

    def show_title(self, d: JobView) -> None:
        job = d.job
        parts = Text.assemble(
            (f"job {job.id} ", "bold"),
            f"{job.kind} · ",
            status_text(job.status),
        )
        if job.progress is not None and job.status == "running":
            parts.append(f" {100 * job.progress:.0f}%{' ' + job.stage if job.stage else ''}")
        if job.eta_s is not None and job.status == "running":
            parts.append(f" · ETA {duration(job.eta_s)}")
        if job.trigger:
            parts.append(f" · {job.trigger}")
        if job.study:
            parts.append(f" · study {job.study}")
        if d.runs:
            parts.append(f" · attempt {d.runs[-1].attempt}")
        if d.error and job.status in ("failed", "lost"):
            parts.append(f" · {d.error}", style="red")
        if parts != self.title_text:  # an unchanged title costs no frame
            self.title_text = parts
            self.query_one("#run-title", Static).update(parts)

    def show_params(self, d: JobView) -> None:
        rows: list[tuple] = [(key, str(value)) for key, value in d.spec.items()]
        if d.depends_on:
            rows.append(("depends on", ", ".join(map(str, d.depends_on))))
        for run in d.runs:
            where = " ".join(
                x for x in (run.host, f"gpu {run.gpu}" if run.gpu else None, run.executor) if x
            )
            rows.append(
                (
                    f"attempt {run.attempt}",
                    f"run {run.id} · {run.status} · {where} · seed {run.seed} · {run.code_version or ''}",
                )
            )
        rows += [(key, value) for key, value in sorted(d.params.items()) if key not in d.spec]
        self.fill("params-table", None, rows)

    def show_artifacts(self, d: JobView) -> None:
        rows = [(a.kind, size(a.bytes), (a.sha256 or "")[:12], a.path) for a in d.artifacts]
        if self.shown_tables.get("artifacts-table") == (None, rows):
            return
        self.fill("artifacts-table", None, rows)
        note = self.query_one("#artifact-path", Static)
        if d.artifacts:
            note.update(d.artifacts[0].path)
        else:
            note.update(f"no artifacts yet{' · work directory ' + d.workdir if d.workdir else ''}")

    @on(DataTable.RowHighlighted, "#artifacts-table")
    def _artifact_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if self.detail is not None and event.cursor_row < len(self.detail.artifacts):
            a = self.detail.artifacts[event.cursor_row]
            self.query_one("#artifact-path", Static).update(f"{a.path}\nsha256 {a.sha256 or '?'}")

    def show_stats(self, d: JobView) -> None:
        betas, rows = stats_rows(dict(d.latest))
        columns = ("statistic", *[f"β={b}" for b in betas]) if rows else ()
        self.fill(
            "trigger-stats",
            columns,
            [(name, *[number(v.get(b)) for b in betas]) for name, v in rows],
        )

    def redraw(self) -> None:
        if not self.is_current:
            return
        if self.query_one("#tabs", TabbedContent).active == "curves":
            self.query_one(CurvesPanel).redraw(self.curves())

    def curves(self) -> list[Curves]:
        """This run's series, then each pinned run's, in its own colour."""
        out = [Curves(self.job_id, self.job_label(self.job_id), self.series, self.colour())]
        for job_id, series in self.pinned.items():
            out.append(Curves(job_id, f"job {job_id}", series, self.mesa.colour_of(job_id)))
        return out

    def colour(self) -> str:
        return self.mesa.colour_of(self.job_id)

    def job_label(self, job_id: int) -> str:
        job = self.detail.job if self.detail is not None else None
        return f"job {job_id}" + (f" {job.method}" if job and job.method else "")

    @on(SelectionList.SelectedChanged, "#series")
    def _series_chosen(self) -> None:
        self.query_one(CurvesPanel).redraw(self.curves())

    @on(TabbedContent.TabActivated)
    def _tab_activated(self) -> None:
        self.redraw()

    # -- actions ----------------------------------------------------------------------------

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_pin(self) -> None:
        """Pin this run: its curves are overlaid on every other run's and chosen in compare."""
        pinned = self.mesa.toggle_pin(self.job_id)
        others = [str(j) for j in self.mesa.pins if j != self.job_id]
        self.notify(
            f"job {self.job_id} {'pinned' if pinned else 'unpinned'}"
            + (f"; overlaid here: job {', '.join(others)}" if others else "")
        )

    def action_regroup(self) -> None:
        panel = self.query_one(CurvesPanel)
        panel.action_regroup()
        self.notify(f"curves grouped by {panel.grouping}")

    def action_plots(self, delta: int) -> None:
        self.query_one(CurvesPanel).turn_page(delta)

    def action_filter_series(self) -> None:
        self.action_tab("curves")
        self.query_one("#series-filter").focus()

    def action_tab(self, tab: str) -> None:
        self.query_one("#tabs", TabbedContent).active = tab

    def _step_tab(self, delta: int) -> None:
        tabs = self.query_one("#tabs", TabbedContent)
        tabs.active = TABS[(TABS.index(tabs.active) + delta) % len(TABS)]

    def action_next_tab(self) -> None:
        self._step_tab(1)

    def action_previous_tab(self) -> None:
        self._step_tab(-1)

    def action_cancel(self) -> None:
        if self.detail is None:
            return
        job = self.detail.job
        if job.status in FINISHED:
            self.notify(
                f"job {job.id} is already {job.status}; nothing to cancel", severity="warning"
            )
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.mesa.send_request(self, "cancel", job.id)

        self.app.push_screen(
            ConfirmModal(f"Cancel job {job.id} ({job.kind}, {job.status})?", "Cancel job"),
            confirmed,
        )

    def action_retry(self) -> None:
        if self.detail is None:
            return
        job = self.detail.job
        if job.status not in RETRYABLE:
            self.notify(
                f"job {job.id} is {job.status}; only failed, cancelled or lost jobs can be retried",
                severity="warning",
            )
            return
        self.mesa.send_request(self, "retry", job.id)

    def action_export(self) -> None:
        """Write this job's report (and its upstream jobs') under the data home, in a worker."""
        self.notify(f"writing the report of job {self.job_id}…")
        self.mesa.send_request(self, "export_report", self.job_id, kind="job", key=self.job_id)

    def on_request_done(self, message: RequestDone) -> None:
        self.notify(message.detail, timeout=10 if message.action == "export_report" else None)
        self.poll()
