"""Modal screens that return a value: confirm, filter, help."""

from __future__ import annotations

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Label, Select, SelectionList

from mesa_tui.source import JobQuery
from store.entities import STATUSES


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
    """Filter the jobs table by status, kind and study; escape leaves it as it was."""

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
        self.dismiss(
            JobQuery(
                statuses=frozenset(statuses) or None,
                kind=None if kind is Select.NULL else str(kind),
                study=None if study is Select.NULL else str(study),
            )
        )

    def action_clear(self) -> None:
        self.dismiss(JobQuery())

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
