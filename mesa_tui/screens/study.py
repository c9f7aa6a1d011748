"""The study screen: ASR after repair per trigger and method, the mean with its interval and the
worst (the study's statistics, as `study show` prints them), the paper's numbers beside ours."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Select, Static

from mesa_tui.messages import RequestDone, StudiesListed, StudyLoaded
from mesa_tui.screens.base import SourceScreen
from mesa_tui.source import Grid, ResultsGrid


def asr_cell(value: float | None) -> Text:
    """ASR as a percentage on a green (0) to red (1) background scale."""
    if value is None:
        return Text("–", justify="center")
    v = max(0.0, min(1.0, value))
    red = int(40 + 180 * min(1.0, 2 * v))
    green = int(40 + 140 * min(1.0, 2 * (1 - v)))
    return Text(
        f"{100 * value:5.1f}",
        style=Style(color="white", bgcolor=f"rgb({red},{green},40)"),
        justify="right",
    )


def interval_cell(interval: tuple[float, float] | None) -> Text:
    """An interval of ASRs in percent, lo–hi (narrow, so five methods fit 80 columns)."""
    if interval is None:
        return Text("–", justify="center")
    lo, hi = interval
    return Text(f"{100 * lo:.1f}–{100 * hi:.1f}", justify="right")


def accuracy_cell(value: float | None) -> Text:
    """Clean accuracy in percent, uncoloured: a low ASR bought with it is no repair."""
    return Text("–" if value is None else f"{100 * value:5.1f}", justify="right")


class StudyScreen(SourceScreen):
    BINDINGS = [
        Binding("enter", "open", "open run"),
        Binding("o", "sort", "sort column"),
        Binding("x", "export", "export report", show=False),
        Binding("escape", "app.switch_mode('jobs')", "jobs"),
        Binding("f5", "reload", "reload", show=False),
    ]

    def __init__(self) -> None:
        super().__init__(id="study")
        self.summary: Grid | None = None
        self.sort_column: str | None = None
        self.sort_reverse = False

    def compose(self) -> ComposeResult:
        yield Static(
            "study · ASR after repair (%), lower is better · o sorts by the column", classes="title"
        )
        yield Select([], prompt="choose a study", id="study-name")
        yield DataTable(id="study-table", cursor_type="cell", zebra_stripes=False)
        yield Static("", id="study-detail", markup=False)
        yield DataTable(id="study-summary", cursor_type="none", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#study-table", DataTable).focus()
        self.list_studies()

    def on_screen_resume(self) -> None:
        self.list_studies()

    @work(
        thread=True,
        exclusive=True,
        exit_on_error=False,
        group="studies",
        description="listing studies",
    )
    def list_studies(self) -> None:
        self.post_message(StudiesListed(self.mesa.source.studies()))

    @work(
        thread=True,
        exclusive=True,
        exit_on_error=False,
        group="study",
        description="reading the study",
    )
    def read_study(self, name: str) -> None:
        self.post_message(StudyLoaded(self.mesa.source.study_summary(name)))

    def on_studies_listed(self, message: StudiesListed) -> None:
        select = self.query_one("#study-name", Select)
        current = select.value
        select.set_options([(n, n) for n in message.names])
        if current in message.names:
            select.value = current
        elif message.names:
            select.value = message.names[0]
        else:
            self.query_one("#study-table", DataTable).clear(columns=True)
            self.notify(
                "no studies yet; create one with `mesa-tui study create NAME --template cpu-mini`"
            )

    @on(Select.Changed, "#study-name")
    def _study_chosen(self, event: Select.Changed) -> None:
        if event.value is not Select.NULL:
            self.read_study(str(event.value))

    def action_reload(self) -> None:
        value = self.query_one("#study-name", Select).value
        if value is not Select.NULL:
            self.read_study(str(value))

    def on_study_loaded(self, message: StudyLoaded) -> None:
        self.summary = message.summary
        self.show()
        if self.summary.statistics_error:
            self.notify(
                f"no intervals for this study: {self.summary.statistics_error}",
                severity="warning",
            )
        if not isinstance(self.focused, Select):
            self.query_one("#study-table", DataTable).focus()

    def show(self) -> None:
        s = self.summary
        if s is None:
            return
        table = self.query_one("#study-table", DataTable)
        table.clear(columns=True)
        table.add_column("trigger", key="trigger")
        for method in s.methods:
            table.add_column(method, key=method)
        for trigger in s.triggers:
            cells = [s.cells.get((trigger, m)) for m in s.methods]
            table.add_row(trigger, *[asr_cell(c.asr if c else None) for c in cells], key=trigger)
        if self.sort_column:
            self._apply_sort()
        summary = self.query_one("#study-summary", DataTable)
        summary.clear(columns=True)
        summary.add_column("", key="row")
        for method in s.methods:
            summary.add_column(method, key=method)
        summary.add_row("mean", *[asr_cell(s.mean(m)) for m in s.methods])
        if any(s.interval(m) for m in s.methods):
            summary.add_row("95% ci", *[interval_cell(s.interval(m)) for m in s.methods])
        summary.add_row("worst", *[asr_cell(s.worst(m)) for m in s.methods])
        summary.add_row("clean acc", *[accuracy_cell(s.acc_clean(m)) for m in s.methods])
        paper = [s.paper_numbers(m) for m in s.methods]
        summary.add_row("paper mean", *[asr_cell(p[0] if p else None) for p in paper])
        summary.add_row("paper worst", *[asr_cell(p[1] if p else None) for p in paper])

    def _apply_sort(self) -> None:
        table = self.query_one("#study-table", DataTable)

        def key(cell: Text | str) -> tuple[int, float | str]:
            text = cell.plain if isinstance(cell, Text) else str(cell)
            try:
                return (0, float(text))
            except ValueError:
                return (1, text)

        table.sort(self.sort_column, key=key, reverse=self.sort_reverse)

    def action_sort(self) -> None:
        table = self.query_one("#study-table", DataTable)
        if not table.columns:
            return
        column = table.coordinate_to_cell_key(table.cursor_coordinate).column_key.value
        if column == self.sort_column:
            self.sort_reverse = not self.sort_reverse
        else:
            self.sort_column, self.sort_reverse = column, False
        self._apply_sort()

    @on(DataTable.CellHighlighted, "#study-table")
    def _cell_highlighted(self, event: DataTable.CellHighlighted) -> None:
        """The cell under the cursor in one line: its interval and the paired difference."""
        detail = None
        if self.summary is not None:
            trigger, method = (
                str(event.cell_key.row_key.value),
                str(event.cell_key.column_key.value),
            )
            line = self.summary.detail(trigger, method)
            detail = f"{trigger} · {line}" if line else trigger
        self.query_one("#study-detail", Static).update(detail or "")

    @on(DataTable.CellSelected, "#study-table")
    def _cell_selected(self) -> None:
        self.action_open()

    def action_open(self) -> None:
        table = self.query_one("#study-table", DataTable)
        if self.summary is None or not table.row_count:
            return
        key = table.coordinate_to_cell_key(table.cursor_coordinate)
        trigger = str(key.row_key.value)
        if isinstance(self.summary, ResultsGrid):  # a result folder: its file, not a job
            self.notify(f"{trigger}: {self.summary.record(trigger)}; `mesa-tui report FOLDER`")
            return
        cell = self.summary.cells.get((trigger, str(key.column_key.value)))
        if cell is None or cell.job_id is None:
            self.notify("no run behind this cell; move to a method column", severity="warning")
            return
        self.mesa.open_job(cell.job_id)

    def action_export(self) -> None:
        """Write the study's report (figures, tables) under the data home, in a thread worker."""
        value = self.query_one("#study-name", Select).value
        if value is Select.NULL:
            self.notify("no study chosen; nothing to export", severity="warning")
            return
        self.notify(f"writing the report of study {value}…")
        self.mesa.send_request(self, "export_report", None, kind="study", key=str(value))

    def on_request_done(self, message: RequestDone) -> None:
        self.notify(message.detail, timeout=10)
