"""The jobs screen: a live table of jobs, the engine's status, and the job actions."""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Static

from mesa_tui.config import JobsView
from mesa_tui.messages import EngineStatusPolled, JobsPolled, RequestDone
from mesa_tui.screens.base import SourceScreen
from mesa_tui.screens.modals import ColumnsModal, ConfirmModal, FilterModal, NoteModal
from mesa_tui.source import EngineStatus, JobQuery
from mesa_tui.widgets.engine_bar import EngineBar
from mesa_tui.widgets.jobs_table import COLUMNS, JobsTable
from mesa_tui.widgets.system_pane import SystemPane
from store.entities import FINISHED, RETRYABLE

FULL_READ_EVERY = 15


class JobsScreen(SourceScreen):
    BINDINGS = [
        Binding("enter", "open", "open", show=True),
        Binding("n", "new", "new"),
        Binding("c", "cancel", "cancel"),
        Binding("r", "retry", "retry"),
        Binding("d", "delete", "delete"),
        Binding("slash", "filter", "filter"),
        Binding("o", "columns", "columns/sort"),
        Binding("t", "annotate", "note/tags"),
        Binding("p", "pin", "pin"),
        Binding("y", "system", "system"),
        Binding("e", "start_engine", "start engine", show=False),
    ]

    def __init__(self) -> None:
        super().__init__(id="jobs")
        self.query_filter = JobQuery()
        self.cursor = None
        self.engine: EngineStatus | None = None
        self.polls = 0

    def compose(self) -> ComposeResult:
        yield Static("mesa-tui · jobs", id="title", classes="title")
        yield EngineBar(id="engine-bar")
        view = self.mesa.config.jobs
        yield Static(self.query_filter.describe(), id="filter-line", classes="subtle")
        yield JobsTable(
            columns=view.columns, sort=view.sort, descending=view.descending, id="jobs-table"
        )
        yield SystemPane(id="system-pane")
        yield Footer()

    def on_mount(self) -> None:
        self._describe()
        self.query_one(EngineBar).show(None, self.mesa.clock())
        self.set_interval(self.mesa.poll_s, self.poll)
        self.poll()

    def on_screen_resume(self) -> None:
        self.poll()

    # -- reading ----------------------------------------------------------------------------

    def poll(self) -> None:
        if not self.is_current:
            return  # hidden under a run or form: on_screen_resume polls when it comes back
        # Now and then the ids of every matching job too, to notice deleted ones; rows are read
        # only for jobs changed since the cursor (all of them at the first read).
        full = self.polls % FULL_READ_EVERY == 0
        self.polls += 1
        self.read_jobs(self.query_filter, self.cursor, full)

    @work(
        thread=True, exclusive=True, exit_on_error=False, group="poll", description="reading jobs"
    )
    def read_jobs(self, query: JobQuery, since: object, all_ids: bool = False) -> None:
        source = self.mesa.source
        page = source.jobs(query, since, all_ids)  # type: ignore[arg-type]
        self.post_message(JobsPolled(page, query))
        self.post_message(EngineStatusPolled(source.engine_status()))

    def on_jobs_polled(self, message: JobsPolled) -> None:
        if message.query != self.query_filter:
            return
        table = self.query_one(JobsTable)
        table.apply(message.page)
        if message.page.cursor is not None and (
            self.cursor is None or message.page.cursor > self.cursor
        ):
            self.cursor = message.page.cursor

    def on_engine_status_polled(self, message: EngineStatusPolled) -> None:
        self.engine = message.status
        self.query_one(EngineBar).show(message.status, self.mesa.clock())
        pane = self.query_one(SystemPane)
        if pane.display:
            pane.show(message.status)

    # -- actions ----------------------------------------------------------------------------

    @on(DataTable.RowSelected, "#jobs-table")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open()

    def action_open(self) -> None:
        job = self.query_one(JobsTable).selected_job()
        if job is not None:
            self.mesa.open_job(job.id)

    def action_new(self) -> None:
        self.mesa.open_new()

    def action_cancel(self) -> None:
        job = self.query_one(JobsTable).selected_job()
        if job is None:
            return
        if job.status in FINISHED:
            self.notify(
                f"job {job.id} is already {job.status}; nothing to cancel", severity="warning"
            )
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.request("cancel", job.id)

        self.app.push_screen(
            ConfirmModal(f"Cancel job {job.id} ({job.kind}, {job.status})?", "Cancel job"),
            confirmed,
        )

    def action_retry(self) -> None:
        job = self.query_one(JobsTable).selected_job()
        if job is None:
            return
        if job.status not in RETRYABLE:
            self.notify(
                f"job {job.id} is {job.status}; only failed, cancelled or lost jobs can be retried",
                severity="warning",
            )
            return
        self.request("retry", job.id)

    def action_delete(self) -> None:
        job = self.query_one(JobsTable).selected_job()
        if job is None:
            return
        if job.status not in FINISHED:
            self.notify(
                f"job {job.id} is {job.status}; cancel it before deleting it", severity="warning"
            )
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.request("delete", job.id)

        self.app.push_screen(
            ConfirmModal(
                f"Delete job {job.id} ({job.kind}, {job.status}) and its artifacts?", "Delete"
            ),
            confirmed,
        )

    def action_filter(self) -> None:
        table = self.query_one(JobsTable)
        kinds = sorted(set(table.kinds()) | set(self.mesa.job_kinds()))

        def chosen(query: JobQuery | None) -> None:
            if query is not None and query != self.query_filter:
                self.query_filter = query
                self.cursor = None
                table.clear()
                table.rows_by_id.clear()
                self._describe()
                self.poll()

        self.app.push_screen(FilterModal(self.query_filter, kinds, table.studies()), chosen)

    def _describe(self) -> None:
        """The filter line: which jobs, and in which order when not newest first."""
        order = self.query_one(JobsTable).describe_order()
        words = self.query_filter.describe() + (f" · {order}" if order else "")
        self.query_one("#filter-line", Static).update(words)

    def action_columns(self) -> None:
        """Choose the columns and the order; the choice is kept in the app's config."""
        table = self.query_one(JobsTable)

        def chosen(answer: tuple[tuple[str, ...], str, bool] | None) -> None:
            if answer is not None:
                table.arrange(*answer)

        self.app.push_screen(
            ColumnsModal(table.chosen, table.sort_column, table.descending), chosen
        )

    def on_jobs_table_arranged(self, message: JobsTable.Arranged) -> None:
        every = all(c.key in message.columns for c in COLUMNS)
        view = JobsView(None if every else message.columns, message.sort, message.descending)
        problem = self.mesa.config.save_jobs_view(view)
        if problem is not None:
            self.notify(problem, severity="warning", timeout=10)
        self._describe()

    def action_system(self) -> None:
        """Show or hide the system pane: each engine's host and slots."""
        pane = self.query_one(SystemPane)
        pane.display = not pane.display
        if pane.display:
            pane.show(self.engine)

    def action_pin(self) -> None:
        """Pin the job: its curves are overlaid on every run screen and chosen in compare."""
        job = self.query_one(JobsTable).selected_job()
        if job is not None:
            pinned = self.mesa.toggle_pin(job.id)
            self.notify(f"job {job.id} {'pinned' if pinned else 'unpinned'} (m compares the pins)")

    def action_annotate(self) -> None:
        job = self.query_one(JobsTable).selected_job()
        if job is None:
            return

        def saved(answer: tuple[str, tuple[str, ...]] | None) -> None:
            if answer is not None and answer != (job.note or "", job.tags):
                note, tags = answer
                self.mesa.send_request(self, "annotate", job.id, note=note, tags=tags)

        self.app.push_screen(NoteModal(job), saved)

    def action_start_engine(self) -> None:
        if self.engine is not None and self.engine.alive:
            self.notify("an engine is already running", severity="information")
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.request("start_engine", None)

        self.app.push_screen(
            ConfirmModal(
                "No engine is running. Start one in the background\n(mesa-tui engine start --detach)?",
                "Start",
            ),
            confirmed,
        )

    def request(self, action: str, job_id: int | None) -> None:
        self.mesa.send_request(self, action, job_id)

    def on_request_done(self, message: RequestDone) -> None:
        self.notify(message.detail)
        if message.action == "delete":
            self.polls = 0
        self.poll()
