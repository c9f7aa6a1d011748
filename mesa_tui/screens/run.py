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

from mesa_tui.messages import (
    JobDetailLoaded,
    LogBatch,
    MetricsBatch,
    MetricsHistory,
    RequestDone,
    SamplesLoaded,
)
from mesa_tui.screens.base import SourceScreen
from mesa_tui.screens.modals import ConfirmModal
from mesa_tui.source import (
    BETA_KEY,
    HISTORY_POINTS,
    JobDetail,
    pca_2d,
    read_trigger_samples,
    search_dirs,
)
from mesa_tui.widgets.curves import PALETTE, CurvesPanel, make_plot
from mesa_tui.widgets.format import duration, number, size, status_text
from mesa_tui.widgets.position_map import PositionMap
from mesa_tui.widgets.series import MetricColumns, SeriesSet
from mesa_tui.widgets.trigger_grid import TriggerGrid
from store.entities import FINISHED, RETRYABLE

TABS = ("curves", "triggers", "embedding", "params", "log", "artifacts")
METRIC_PAGE = 10_000  # small pages keep each batch's handling short on the event loop
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
    ]

    def __init__(self, job_id: int) -> None:
        super().__init__(classes="run")
        self.job_id = job_id
        self.detail: JobDetail | None = None
        self.series = SeriesSet()
        self.history_asked = False  # the history is read once, downsampled; then only new points
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
        self.reader = self.read_run(
            self.series.cursor,
            self.log_cursor,
            self.samples_stamp if want_samples else None,
            self.polls % DETAIL_EVERY == 1 or self.detail is None,
            want_history,
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
    ) -> None:
        source = self.mesa.source
        worker = get_current_worker()
        if with_detail or self.detail is None:
            detail = source.job_detail(self.job_id)
            self.post_message(JobDetailLoaded(detail))
        else:
            detail = self.detail  # status and runs change slowly; metrics are read every poll
        runs = detail.run_ids
        if not runs:
            return
        if with_history:
            # Every point so far in one downsampled read (a few thousand values per series,
            # however long the run); the loop below then reads only the points after it.
            history = source.metric_history(self.job_id, HISTORY_POINTS)
            self.post_message(MetricsHistory(self.job_id, history))
            metric_cursor = max(metric_cursor, history.cursor)
        while not worker.is_cancelled:
            points = source.metric_points(runs, metric_cursor, METRIC_PAGE)
            if points:
                self.post_message(MetricsBatch(self.job_id, MetricColumns(points)))
                metric_cursor = points[-1].id
            if len(points) < METRIC_PAGE:
                break
        lines = source.logs(runs, log_cursor)
        if lines:
            self.post_message(LogBatch(self.job_id, lines))
        if samples_stamp is not None:
            samples = read_trigger_samples(search_dirs(detail), samples_stamp)
            if samples is not None:
                self.post_message(SamplesLoaded(self.job_id, samples, pca_2d(samples.by_beta)))

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

    def on_metrics_history(self, message: MetricsHistory) -> None:
        self.series.load_history(message.history)

    def on_metrics_batch(self, message: MetricsBatch) -> None:
        self.series.add_columns(message.columns)

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
        self.query_one(PositionMap).show(message.samples.positions)
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

    def show_title(self, d: JobDetail) -> None:
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

    def show_params(self, d: JobDetail) -> None:
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

    def show_artifacts(self, d: JobDetail) -> None:
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

    def show_stats(self, d: JobDetail) -> None:
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
            self.query_one(CurvesPanel).redraw(self.series)

    @on(SelectionList.SelectedChanged, "#series")
    def _series_chosen(self) -> None:
        self.query_one(CurvesPanel).redraw(self.series)

    @on(TabbedContent.TabActivated)
    def _tab_activated(self) -> None:
        self.redraw()

    # -- actions ----------------------------------------------------------------------------

    def action_back(self) -> None:
        self.app.pop_screen()

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
