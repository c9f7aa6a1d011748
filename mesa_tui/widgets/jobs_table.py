"""The jobs table: applies deltas from the poller in place, newest job first."""

from __future__ import annotations

import contextlib
from datetime import datetime

from rich.text import Text
from textual.widgets import DataTable
from textual.widgets.data_table import CellDoesNotExist, RowDoesNotExist

from mesa_tui.source import JobRow, JobsPage
from mesa_tui.widgets.format import duration, sparkline, status_text

COLUMNS = (
    ("id", "id"),
    ("kind", "kind"),
    ("study", "study"),
    ("trigger", "trigger"),
    ("status", "status"),
    ("prog", "prog"),
    ("eta", "ETA"),
    ("acc", "acc%"),
    ("asr", "asr%"),
    ("loss", "loss"),
)


def _pct(value: float | None) -> Text:
    return Text("" if value is None else f"{100 * value:.1f}", justify="right")


def row_cells(row: JobRow) -> tuple[object, ...]:
    progress = "" if row.progress is None else f"{100 * row.progress:.0f}%"
    return (
        Text(str(row.id), justify="right"),
        row.kind,
        (row.study or "")[:10],
        (row.trigger or "")[:10],
        status_text(row.status),
        Text(progress, justify="right"),
        duration(row.eta_s) if row.status == "running" else "",
        _pct(row.acc_clean),
        _pct(row.asr),
        Text(sparkline(row.loss_tail, 10), style="cyan"),
    )


class JobsTable(DataTable):
    """Rows keyed by job id; ``apply`` upserts the delta and drops jobs that no longer match."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self.rows_by_id: dict[int, JobRow] = {}

    def on_mount(self) -> None:
        for key, label in COLUMNS:
            self.add_column(label, key=key)

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
            cells = row_cells(row)
            if old is None:
                self.add_row(*cells, key=str(row.id))
                changed = True
            elif old != row:
                for (key, _), new, before in zip(COLUMNS, cells, row_cells(old), strict=True):
                    if new != before:
                        self.update_cell(str(row.id), key, new)
        if changed:
            self.sort("id", key=lambda cell: int(cell.plain), reverse=True)
        return changed

    def selected_job(self) -> JobRow | None:
        if not self.rows_by_id or self.cursor_row < 0:
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
