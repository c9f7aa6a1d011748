"""The jobs table: applies deltas from the poller in place, sorted by any column (newest job
first until told otherwise).

Its columns are the user's choice (``o``, saved in the app's config), fitted to the table's width:
each has a least width, a rank (the narrower the terminal, the more of the highest ranks are left
out) and a share of what is left over, so nothing is cut at 60 columns and the method, trigger,
study and loss spark line use the room at 120.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rich.text import Text
from textual import events, on
from textual.message import Message
from textual.widgets import DataTable
from textual.widgets.data_table import CellDoesNotExist, RowDoesNotExist

from mesa_tui.source import JobRow, JobsPage
from mesa_tui.widgets.format import duration, sparkline, status_text
from store.entities import STATUSES

PADDING = 2  # a DataTable cell's padding, one each side
SCROLLBAR = 2  # kept free for the vertical scroll bar, so rows never push the last column out


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    width: int  # the least width
    rank: int  # left out first when the table is narrow: highest rank first
    grow: int = 0  # share of the spare width
    most: int = 0  # the widest it grows to
    want: int = 0  # given first out of the spare width, before the shares
    about: str = ""  # what the column shows, in the columns dialog


def _pct(value: float | None) -> Text:
    return Text("" if value is None else f"{100 * value:.1f}", justify="right")


def _fit(text: str | None, width: int) -> str:
    text = text or ""
    return text if len(text) <= width else text[: width - 1] + "…"


COLUMNS = (
    Column("id", "id", 3, 0, about="the job's number (always shown)"),
    Column("kind", "kind", 6, 2, about="train, mesa, detect or defend"),
    Column("method", "method", 8, 1, grow=3, most=28, want=13, about="what tells rows apart"),
    Column("study", "study", 6, 9, grow=1, most=14, about="the study the job belongs to"),
    Column("trigger", "trigger", 12, 3, grow=1, most=16, about="the trigger it attacks or repairs"),
    Column("status", "status", 9, 0, about="queued, running, succeeded ..."),
    Column("prog", "prog", 4, 4, about="progress of the current stage"),
    Column("eta", "ETA", 6, 6, about="time left, while running"),
    Column("acc", "acc%", 5, 7, about="clean accuracy, last"),
    Column("asr", "asr%", 5, 5, about="attack success rate, last"),
    Column("best", "best%", 5, 8, about="defense's lowest ASR, attack's highest"),
    Column("loss", "loss", 8, 10, grow=2, most=24, about="the loss's last values"),
    Column(
        "note", "note", 8, 11, grow=2, most=40, want=10, about="#tags and the note (t edits them)"
    ),
)
BY_KEY = {c.key: c for c in COLUMNS}
ALWAYS = "id"  # the rows' key: shown whatever the choice


def layout(width: int, chosen: Collection[str] | None = None) -> dict[str, int]:
    """The columns shown in a table ``width`` cells wide and their widths, in display order:
    of the ``chosen`` columns (all when None), those that fit."""
    room = width - SCROLLBAR
    shown = [c for c in COLUMNS if chosen is None or c.key in chosen or c.key == ALWAYS]
    for column in sorted(shown, key=lambda c: -c.rank):
        if sum(c.width + PADDING for c in shown) <= room or column.rank == 0:
            break
        shown.remove(column)
    widths = {c.key: c.width for c in shown}
    spare = room - sum(w + PADDING for w in widths.values())
    for c in shown:
        extra = min(max(0, c.want - widths[c.key]), max(0, spare))
        widths[c.key] += extra
        spare -= extra
    while spare > 0:
        growing = [c for c in shown if c.grow and widths[c.key] < c.most]
        if not growing:
            break
        total = sum(c.grow for c in growing)
        given = 0
        for c in growing:
            extra = min(c.most - widths[c.key], max(1, spare * c.grow // total), spare - given)
            widths[c.key] += extra
            given += extra
        spare -= given
        if given == 0:
            break
    return widths


CELLS: dict[str, Callable[[JobRow, int], object]] = {
    "id": lambda row, w: Text(str(row.id), justify="right"),
    "kind": lambda row, w: _fit(row.kind, w),
    "method": lambda row, w: _fit(row.method, w),
    "study": lambda row, w: _fit(row.study, w),
    "trigger": lambda row, w: _fit(row.trigger, w),
    "status": lambda row, w: status_text(row.status),
    "prog": lambda row, w: Text(
        "" if row.progress is None else f"{100 * row.progress:.0f}%", justify="right"
    ),
    "eta": lambda row, w: duration(row.eta_s) if row.status == "running" else "",
    "acc": lambda row, w: _pct(row.acc_clean),
    "asr": lambda row, w: _pct(row.asr),
    "best": lambda row, w: _pct(row.asr_best),
    "loss": lambda row, w: Text(sparkline(row.loss_tail, w), style="cyan"),
    "note": lambda row, w: _note(row, w),
}


def _note(row: JobRow, width: int) -> Text:
    """Tags first (as #tag, in the accent colour), then the note."""
    text = Text(no_wrap=True, overflow="ellipsis")
    for tag in row.tags:
        text.append(f"#{tag} ", style="bold magenta")
    text.append(row.note or "")
    text.truncate(width, overflow="ellipsis")
    return text


def _last(values: tuple[float, ...]) -> float | None:
    return values[-1] if values else None


_NUMBER = re.compile(r"(\d+)")


def _words(text: str | None) -> tuple[Any, ...] | None:
    """Text in the order a reader expects: case aside, numbers by value (bw:85 before bw:170,
    point #3 before point #10); None for no text."""
    if not text:
        return None
    parts = _NUMBER.split(text.lower())  # words at even places, numbers at odd ones
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


# What each column sorts by; None (and NaN) sorts after every value, whichever the direction.
SORT_VALUES: dict[str, Callable[[JobRow], Any]] = {
    "id": lambda row: row.id,
    "kind": lambda row: _words(row.kind),
    "method": lambda row: _words(row.method),
    "study": lambda row: _words(row.study),
    "trigger": lambda row: _words(row.trigger),
    "status": lambda row: STATUSES.index(row.status) if row.status in STATUSES else None,
    "prog": lambda row: row.progress,
    "eta": lambda row: row.eta_s if row.status == "running" else None,
    "acc": lambda row: row.acc_clean,
    "asr": lambda row: row.asr,
    "best": lambda row: row.asr_best,
    "loss": lambda row: _last(row.loss_tail),
    "note": lambda row: _words(" ".join((*row.tags, row.note or "")).strip()),
}
# The first direction a column sorts in: numbers and times high first, words from a.
HIGH_FIRST = frozenset({"id", "prog", "eta", "acc", "asr", "best", "loss"})


def sort_key(column: str, descending: bool) -> Callable[[JobRow], tuple[Any, ...]]:
    """A key for ``sorted(rows, reverse=descending)``: the column's value, missing ones (None,
    NaN) last in either direction, then the newest job first among equals, so the order is total
    and a row moves only when its value does."""
    value = SORT_VALUES[column]

    def key(row: JobRow) -> tuple[Any, ...]:
        v = value(row)
        missing = v is None or (isinstance(v, float) and math.isnan(v))
        tie = row.id if descending else -row.id
        # Reversed, a missing value must compare low to come last; in order, high.
        return (missing != descending, 0 if missing else v, tie)

    return key


def chosen_columns(columns: Collection[str] | None) -> tuple[str, ...]:
    """The columns to show, in display order: those of ``columns`` the table knows, and the id
    always. Names it does not know are ignored; None, or names of which the table knows none (a
    config from another version), stand for every column."""
    known = [c.key for c in COLUMNS if columns is not None and c.key in columns]
    if columns is None or (columns and not known):
        return tuple(c.key for c in COLUMNS)
    return tuple(c.key for c in COLUMNS if c.key in known or c.key == ALWAYS)


def known_order(sort: str, descending: bool) -> tuple[str, bool]:
    """``(sort, descending)``, or newest first when ``sort`` names no column."""
    return (sort, descending) if sort in BY_KEY else ("id", True)


def row_cells(row: JobRow, widths: dict[str, int] | None = None) -> tuple[object, ...]:
    """The cells of a row for the columns in ``widths`` (all columns at their least widths)."""
    widths = widths if widths is not None else {c.key: c.width for c in COLUMNS}
    return tuple(CELLS[key](row, width) for key, width in widths.items())


class JobsTable(DataTable):
    """Rows keyed by job id; ``apply`` upserts the delta and drops jobs that no longer match.

    A click on a header sorts by that column (again: the other way); ``arrange`` sets the shown
    columns and the order, and either posts ``Arranged`` for the screen to save.
    """

    class Arranged(Message):
        def __init__(self, columns: tuple[str, ...], sort: str, descending: bool) -> None:
            super().__init__()
            self.columns = columns
            self.sort = sort
            self.descending = descending

    def __init__(
        self,
        *,
        columns: Collection[str] | None = None,
        sort: str = "id",
        descending: bool = True,
        id: str | None = None,
    ) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self.rows_by_id: dict[int, JobRow] = {}
        self.widths: dict[str, int] = {}
        self.chosen = chosen_columns(columns)
        self.sort_column, self.descending = known_order(sort, descending)

    def on_mount(self) -> None:
        self._lay_out(self.size.width or 80)

    def on_resize(self, event: events.Resize) -> None:
        self._lay_out(event.size.width)

    def arrange(self, columns: Collection[str], sort: str, descending: bool) -> None:
        """Show ``columns`` (as far as they fit) and sort by ``sort``; tells the screen."""
        self.chosen = chosen_columns(columns)
        self.sort_column, self.descending = known_order(sort, descending)
        self._lay_out(self.size.width or 80, force=True)
        self.post_message(self.Arranged(self.chosen, self.sort_column, self.descending))

    @on(DataTable.HeaderSelected)
    def _header_selected(self, event: DataTable.HeaderSelected) -> None:
        event.stop()
        column = str(event.column_key.value)
        if column == self.sort_column:
            descending = not self.descending
        else:
            descending = column in HIGH_FIRST
        self.arrange(self.chosen, column, descending)

    def _lay_out(self, width: int, force: bool = False) -> None:
        """Rebuilds the columns (and rows) when the width or the choice calls for other columns
        or widths."""
        widths = layout(width, self.chosen)
        if widths == self.widths and not force:
            return
        selected = self.selected_job()
        self.widths = widths
        self.clear(columns=True)
        for key, w in widths.items():
            self.add_column(self._header(key, w), key=key, width=w)
        for row in self.rows_by_id.values():
            self.add_row(*row_cells(row, widths), key=str(row.id))
        if self.rows_by_id:
            self._sort(selected)

    def _header(self, key: str, width: int) -> Text:
        """The sort column's header is underlined, with its direction where that fits."""
        label = BY_KEY[key].label
        if key != self.sort_column or self.is_default_order():
            return Text(label)
        arrow = "↓" if self.descending else "↑"
        return Text(label + arrow if len(label) < width else label, style="bold underline")

    def is_default_order(self) -> bool:
        return self.sort_column == "id" and self.descending

    def describe_order(self) -> str:
        """The order in words, for the filter line ("" for newest first)."""
        if self.is_default_order():
            return ""
        way = "descending" if self.descending else "ascending"
        return f"sorted by {BY_KEY[self.sort_column].label}, {way}"

    def _sort(self, keep: JobRow | None = None) -> None:
        """Sort the rows; the cursor stays on the job it was on, not on its row number."""
        keep = keep if keep is not None else self.selected_job()
        by = sort_key(self.sort_column, self.descending)
        rows = self.rows_by_id
        self.sort("id", key=lambda cell: by(rows[int(cell.plain)]), reverse=self.descending)
        if keep is not None and keep.id in rows:
            self.move_cursor(row=self.get_row_index(str(keep.id)), animate=False)

    def apply(self, page: JobsPage) -> bool:
        """Returns True when rows were added or removed (the caller may re-sort)."""
        changed = resort = False
        keep = self.selected_job()
        for gone in set(self.rows_by_id) - set(
            page.ids if page.ids is not None else self.rows_by_id
        ):
            del self.rows_by_id[gone]
            with contextlib.suppress(RowDoesNotExist):
                self.remove_row(str(gone))
            changed = True
        by = sort_key(self.sort_column, self.descending)
        for row in page.rows:
            if page.ids is not None and row.id not in page.ids:
                continue
            old = self.rows_by_id.get(row.id)
            self.rows_by_id[row.id] = row
            cells = row_cells(row, self.widths)
            if old is None:
                self.add_row(*cells, key=str(row.id))
                changed = True
            elif old != row:
                resort = resort or by(old) != by(row)
                before = row_cells(old, self.widths)
                for key, new, was in zip(self.widths, cells, before, strict=True):
                    if new != was:
                        self.update_cell(str(row.id), key, new)
        if changed or resort:
            self._sort(keep)
        return changed

    def selected_job(self) -> JobRow | None:
        if not self.rows_by_id or self.cursor_row < 0 or self.row_count == 0:
            return None
        try:
            key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except CellDoesNotExist:
            return None
        return self.rows_by_id.get(int(key)) if key is not None else None

    def kinds(self) -> list[str]:
        return sorted({r.kind for r in self.rows_by_id.values()})

    def studies(self) -> list[str]:
        return sorted({r.study for r in self.rows_by_id.values() if r.study})

    def newest_update(self) -> datetime | None:
        return max((r.updated_at for r in self.rows_by_id.values()), default=None)
