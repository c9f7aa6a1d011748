"""The jobs table: applies deltas from the poller in place, newest job first.

Its columns follow the table's width: each has a least width, a rank (the narrower the terminal,
the more of the highest ranks are left out) and a share of what is left over, so nothing is cut
at 60 columns and the label, trigger, study and loss spark line use the room at 120.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from rich.text import Text
from textual import events
from textual.widgets import DataTable
from textual.widgets.data_table import CellDoesNotExist, RowDoesNotExist

from mesa_tui.source import JobRow, JobsPage
from mesa_tui.widgets.format import duration, sparkline, status_text

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


def _pct(value: float | None) -> Text:
    return Text("" if value is None else f"{100 * value:.1f}", justify="right")


def _fit(text: str | None, width: int) -> str:
    text = text or ""
    return text if len(text) <= width else text[: width - 1] + "…"


COLUMNS = (
    Column("id", "id", 3, 0),
    Column("kind", "kind", 6, 2),
    Column("method", "method", 8, 1, grow=3, most=28),
    Column("study", "study", 6, 8, grow=1, most=14),
    Column("trigger", "trigger", 12, 3, grow=1, most=16),
    Column("status", "status", 9, 0),
    Column("prog", "prog", 4, 4),
    Column("eta", "ETA", 6, 6),
    Column("acc", "acc%", 5, 7),
    Column("asr", "asr%", 5, 5),
    Column("loss", "loss", 10, 9, grow=2, most=24),
    Column("note", "note", 8, 10, grow=2, most=40),
)


def layout(width: int) -> dict[str, int]:
    """The columns shown in a table ``width`` cells wide and their widths, in display order."""
    room = width - SCROLLBAR
    shown = list(COLUMNS)
    for column in sorted(COLUMNS, key=lambda c: -c.rank):
        if sum(c.width + PADDING for c in shown) <= room or column.rank == 0:
            break
        shown.remove(column)
    widths = {c.key: c.width for c in shown}
    spare = room - sum(w + PADDING for w in widths.values())
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


def row_cells(row: JobRow, widths: dict[str, int] | None = None) -> tuple[object, ...]:
    """The cells of a row for the columns in ``widths`` (all columns at their least widths)."""
    widths = widths if widths is not None else {c.key: c.width for c in COLUMNS}
    return tuple(CELLS[key](row, width) for key, width in widths.items())


class JobsTable(DataTable):
    """Rows keyed by job id; ``apply`` upserts the delta and drops jobs that no longer match."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self.rows_by_id: dict[int, JobRow] = {}
        self.widths: dict[str, int] = {}

    def on_mount(self) -> None:
        self._lay_out(self.size.width or 80)

    def on_resize(self, event: events.Resize) -> None:
        self._lay_out(event.size.width)

    def _lay_out(self, width: int) -> None:
        """Rebuilds the columns (and rows) when the width calls for other columns or widths."""
        widths = layout(width)
        if widths == self.widths:
            return
        selected = self.selected_job()
        self.widths = widths
        self.clear(columns=True)
        for key, w in widths.items():
            label = next(c.label for c in COLUMNS if c.key == key)
            self.add_column(label, key=key, width=w)
        for row in self.rows_by_id.values():
            self.add_row(*row_cells(row, widths), key=str(row.id))
        if self.rows_by_id:
            self._sort()
        if selected is not None and selected.id in self.rows_by_id:
            self.move_cursor(row=self.get_row_index(str(selected.id)))

    def _sort(self) -> None:
        self.sort("id", key=lambda cell: int(cell.plain), reverse=True)

    def apply(self, page: JobsPage) -> bool:
        """Returns True when rows were added or removed (the caller may re-sort)."""
        changed = False
        for gone in set(self.rows_by_id) - set(
            page.ids if page.ids is not None else self.rows_by_id
        ):
            del self.rows_by_id[gone]
            with contextlib.suppress(RowDoesNotExist):
                self.remove_row(str(gone))
            changed = True
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
                before = row_cells(old, self.widths)
                for key, new, was in zip(self.widths, cells, before, strict=True):
                    if new != was:
                        self.update_cell(str(row.id), key, new)
        if changed:
            self._sort()
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
