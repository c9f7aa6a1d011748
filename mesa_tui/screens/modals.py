"""Modal screens that return a value: confirm, filter, note and tags, columns, help."""

from __future__ import annotations

from collections.abc import Sequence

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, DataTable, Input, Label, Select, SelectionList

from mesa_tui.source import JobQuery, JobRow
from mesa_tui.widgets.jobs_table import ALWAYS, COLUMNS
from store.entities import STATUSES, tag_problem


class ConfirmModal(ModalScreen[bool]):
    """A yes/no question; y/enter say yes, n/escape say no."""

    BINDINGS = [
        Binding("y", "answer(True)", "yes"),
        Binding("n,escape", "answer(False)", "no"),
    ]

    def __init__(self, question: str, yes: str = "Yes") -> None:
        super().__init__(classes="modal")
        self.question = question
        self.yes = yes

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question, classes="question")
            with Horizontal(classes="buttons"):
                yield Button(f"{self.yes} (y)", id="yes", variant="error")
                yield Button("No (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class FilterModal(ModalScreen[JobQuery | None]):
    """Filter the jobs table by status, kind, study and text (in a label, note or tag); escape
    leaves it as it was."""

    BINDINGS = [
        Binding("escape", "close", "cancel"),
        Binding("ctrl+s", "apply", "apply"),
        Binding("ctrl+x", "clear", "clear filter"),
    ]

    def __init__(self, query: JobQuery, kinds: list[str], studies: list[str]) -> None:
        super().__init__(classes="modal")
        self.current = query
        self.kinds = kinds
        self.studies = studies

    def compose(self) -> ComposeResult:
        q = self.current
        with Vertical(classes="dialog filter"):
            yield Label(
                "Filter jobs  (space toggles, ctrl+s applies, ctrl+x clears)", classes="question"
            )
            yield Input(
                q.text or "", placeholder="find in label, note or tags", id="find", compact=True
            )
            yield SelectionList[str](
                *[(s, s, q.statuses is not None and s in q.statuses) for s in STATUSES],
                id="statuses",
            )
            yield Select(
                [(k, k) for k in self.kinds],
                prompt="any kind",
                value=q.kind or Select.NULL,
                id="kind",
            )
            yield Select(
                [(s, s) for s in self.studies],
                prompt="any study",
                value=q.study or Select.NULL,
                id="study",
            )
            with Horizontal(classes="buttons"):
                yield Button("Apply", id="apply", variant="primary")
                yield Button("Clear", id="clear")

    def on_mount(self) -> None:
        self.query_one("#statuses").focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "apply":
            self.action_apply()
        else:
            self.action_clear()

    def action_apply(self) -> None:
        statuses = self.query_one("#statuses", SelectionList).selected
        kind = self.query_one("#kind", Select).value
        study = self.query_one("#study", Select).value
        text = self.query_one("#find", Input).value.strip()
        self.dismiss(
            JobQuery(
                statuses=frozenset(statuses) or None,
                kind=None if kind is Select.NULL else str(kind),
                study=None if study is Select.NULL else str(study),
                text=text or None,
            )
        )

    def on_input_submitted(self) -> None:
        self.action_apply()

    def action_clear(self) -> None:
        self.dismiss(JobQuery())

    def action_close(self) -> None:
        self.dismiss(None)


class NoteModal(ModalScreen[tuple[str, tuple[str, ...]] | None]):
    """A job's tags (words) and note; enter or ctrl+s saves, escape leaves them as they were."""

    BINDINGS = [
        Binding("escape", "close", "cancel"),
        Binding("ctrl+s", "save", "save"),
    ]

    def __init__(self, job: JobRow) -> None:
        super().__init__(classes="modal")
        self.job = job

    def compose(self) -> ComposeResult:
        job = self.job
        with Vertical(classes="dialog note"):
            yield Label(f"Job {job.id} · {job.method or job.kind}", classes="question")
            yield Label("tags, one word each", classes="subtle")
            yield Input(" ".join(job.tags), placeholder="baseline paper", id="tags", compact=True)
            yield Label("note", classes="subtle")
            yield Input(job.note or "", placeholder="what to remember", id="note", compact=True)
            yield Label("", id="note-error", classes="field-error")
            with Horizontal(classes="buttons"):
                yield Button("Save (ctrl+s)", id="save", variant="primary")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#note" if self.job.tags else "#tags", Input).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_save() if event.button.id == "save" else self.action_close()

    def on_input_submitted(self) -> None:
        self.action_save()

    def action_save(self) -> None:
        tags = tuple(self.query_one("#tags", Input).value.replace(",", " ").split())
        problem = next((p for p in map(tag_problem, tags) if p), None)
        if problem:  # said here, before a request the store would refuse
            error = self.query_one("#note-error", Label)
            error.update(problem)
            error.add_class("shown")
            return
        self.dismiss((self.query_one("#note", Input).value.strip(), tags))

    def action_close(self) -> None:
        self.dismiss(None)


class ColumnsModal(ModalScreen[tuple[tuple[str, ...], str, bool] | None]):
    """The jobs table's columns (space toggles) and the column it is sorted by; ctrl+s applies
    (the app saves the choice in its config), escape leaves both as they were."""

    BINDINGS = [
        Binding("escape", "close", "cancel"),
        Binding("ctrl+s", "apply", "apply"),
    ]

    def __init__(self, shown: Sequence[str], sort: str, descending: bool) -> None:
        super().__init__(classes="modal")
        self.shown = tuple(shown)
        self.sort = sort
        self.descending = descending

    def compose(self) -> ComposeResult:
        choices = [c for c in COLUMNS if c.key != ALWAYS]
        width = max(len(c.label) for c in choices)
        with Vertical(classes="dialog columns"):
            yield Label("Columns and order  (space toggles, ctrl+s applies)", classes="question")
            yield SelectionList[str](
                *[(f"{c.label:<{width}}  {c.about}", c.key, c.key in self.shown) for c in choices],
                id="columns",
                compact=True,
            )
            with Horizontal(classes="sort-row"):
                yield Label("sort by", classes="sort-label")
                yield Select(
                    [(c.label, c.key) for c in COLUMNS],
                    value=self.sort,
                    allow_blank=False,
                    id="sort",
                    compact=True,
                )
                yield Checkbox("descending", self.descending, id="descending", compact=True)
            with Horizontal(classes="buttons"):
                yield Button("Apply", id="apply", variant="primary")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#columns").focus()
        self._fit(self.size.height)

    def on_resize(self, event: events.Resize) -> None:
        self._fit(event.size.height)

    def _fit(self, height: int) -> None:
        """Every column where the screen has room, else the list scrolls."""
        room = height - 12  # border, padding, title, the sort row and the buttons
        rows = self.query_one("#columns", SelectionList).option_count
        self.query_one("#columns").styles.height = max(3, min(rows, room))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_apply() if event.button.id == "apply" else self.action_close()

    def action_apply(self) -> None:
        columns = tuple(self.query_one("#columns", SelectionList).selected)
        sort = self.query_one("#sort", Select).value
        descending = self.query_one("#descending", Checkbox).value
        self.dismiss((columns, str(sort), descending))

    def action_close(self) -> None:
        self.dismiss(None)


class HelpModal(ModalScreen[None]):
    """The key bindings of the screen underneath, and the global ones."""

    BINDINGS = [Binding("escape,q,question_mark", "close", "close")]

    def __init__(self, rows: list[tuple[str, str]]) -> None:
        super().__init__(classes="modal")
        self.rows = rows

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog help"):
            yield Label("Keys  (escape closes)", classes="question")
            yield DataTable(id="help-keys", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("key", "does")
        for key, description in self.rows:
            table.add_row(key, description)
        table.focus()
        self._fit(self.size.height)

    def on_resize(self, event: events.Resize) -> None:
        self._fit(event.size.height)

    def _fit(self, height: int) -> None:
        """The table shows every key (and its header) where the screen has room, else scrolls."""
        room = height - 5  # the dialog's border, the title and its margins
        self.query_one(DataTable).styles.height = max(3, min(len(self.rows) + 1, room))

    def action_close(self) -> None:
        self.dismiss(None)
