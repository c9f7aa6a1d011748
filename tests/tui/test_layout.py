"""The jobs screen and the help dialog at 60x20, 80x24 and 120x40, read back as rendered text:
columns that fit the width, triggers not cut, and no block glyph (a scroll bar's thumb end)
anywhere but in the loss spark line."""

from __future__ import annotations

import pytest
from textual.widgets import DataTable

from mesa_tui.widgets.jobs_table import PADDING, JobsTable, layout

from .conftest import make_app, refresh_screen, settle, wait_until

BLOCKS = set("▁▂▃▄▅▆▇█▉▊▋▌▍▎")
SIZES = [(60, 20), (80, 24), (120, 40)]


def screen_lines(app) -> list[str]:
    return ["".join(s.text for s in strip) for strip in app.screen._compositor.render_strips()]


def stray_blocks(lines: list[str], allowed: range | None = None) -> list[tuple[int, int, str]]:
    """(row, column, glyph) of every block glyph outside ``allowed`` columns."""
    return [
        (y, x, ch)
        for y, line in enumerate(lines)
        for x, ch in enumerate(line)
        if ch in BLOCKS and (allowed is None or x not in allowed)
    ]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
async def test_jobs_columns_fit_and_no_stray_block(demo, clock, size) -> None:
    app = make_app(demo, clock)
    async with app.run_test(size=size) as pilot:
        await settle(pilot)
        await refresh_screen(pilot)
        table = app.screen.query_one(JobsTable)
        assert table.widths == layout(table.size.width)
        assert sum(w + PADDING for w in table.widths.values()) <= table.size.width
        assert table.max_scroll_x == 0  # no horizontal scroll bar: every shown column fits
        lines = screen_lines(app)
        assert any("square:white" in line for line in lines)  # the trigger is never cut
        methods = {table.get_row(str(job_id))[2] for job_id in (1, 2, 3)}
        assert len(methods) == 3  # the method column tells the rows apart
        header = next(line for line in lines if line.startswith(" id "))
        loss = range(0)
        if "loss" in table.widths:
            start = header.index("loss")
            loss = range(start, start + table.widths["loss"])
        assert stray_blocks(lines[:-1], loss) == []  # the footer's own separator aside
        if size[0] >= 120:
            assert {"study", "asr", "best", "loss", "note"} <= set(table.widths)
            assert table.get_row("3")[2] == "mesa-ensemble"  # the method is not cut


async def test_help_fits_at_120x40_without_scroll_bar(demo, clock) -> None:
    app = make_app(demo, clock)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        await pilot.press("question_mark")
        await settle(pilot)
        keys = app.screen.query_one("#help-keys", DataTable)
        assert keys.max_scroll_y == 0 and keys.size.height == keys.row_count + 1
        region = keys.region
        inside = [line[region.x : region.right] for line in screen_lines(app)]
        assert stray_blocks(inside[region.y : region.bottom]) == []


async def test_help_scrolls_where_its_keys_do_not_fit(demo, clock) -> None:
    app = make_app(demo, clock)
    async with app.run_test(size=(60, 20)) as pilot:
        await settle(pilot)
        await pilot.press("question_mark")
        await settle(pilot)
        keys = app.screen.query_one("#help-keys", DataTable)
        assert keys.max_scroll_y > 0 and keys.show_vertical_scrollbar
        await pilot.press("ctrl+end")
        await wait_until(pilot, lambda: keys.scroll_y == keys.max_scroll_y)  # the last keys show


def widgets(app):
    """Every widget of every screen on the stack (a dialog shows the screen under it)."""
    for screen in app.screen_stack:
        yield from screen.walk_children(with_self=True)


def border_cells(app) -> set[tuple[int, int]]:
    """The outer cells of every widget drawn with a border (tall borders are block glyphs)."""
    cells: set[tuple[int, int]] = set()
    for widget in widgets(app):
        if not widget.display or not any(edge[0] for edge in widget.styles.border):
            continue
        r = widget.region
        for x in range(r.x, r.right):
            cells |= {(r.y, x), (r.bottom - 1, x)}
        for y in range(r.y, r.bottom):
            cells |= {(y, r.x), (y, r.right - 1)}
    return cells


def drawn_by(app, *kinds: str) -> set[tuple[int, int]]:
    """Cells inside widgets whose content is made of blocks (the trigger grid's pixels)."""
    return {
        (y, x)
        for widget in widgets(app)
        if type(widget).__name__ in kinds
        for y in range(widget.region.y, widget.region.bottom)
        for x in range(widget.region.x, widget.region.right)
    }


def checkbox(line: str, x: int) -> bool:
    """A selection list's check box ``▐X▌`` is drawn with half blocks."""
    return line[x - 1 : x + 2] == "▐X▌" or line[x - 2 : x + 1] == "▐X▌"


def open_job(job_id: int):
    return lambda pilot: pilot.app.open_job(job_id)


SCREENS = {
    "run-curves": (open_job(2),),
    "run-triggers": (open_job(2), "2"),
    "run-embedding": (open_job(2), "3"),
    "run-params": (open_job(1), "4"),
    "run-log": (open_job(1), "5"),
    "run-artifacts": (open_job(1), "6"),
    "new": ("n",),
    "study": ("s",),
    "compare": ("m", lambda pilot: pilot.app.toggle_pin(1) or pilot.app.toggle_pin(2), "m"),
    "system": ("y",),
    "note": ("t",),
    "filter": ("slash",),
    "columns": ("o",),
    "cancel": ("c",),
}


@pytest.mark.parametrize("screen", SCREENS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
async def test_no_stray_block_on_any_screen(demo, clock, size, screen) -> None:
    """A block glyph is a stray unless it is a widget's border or a trigger pixel: a scroll bar
    thumb's end, a plot that overflows, a cut cell."""
    app = make_app(demo, clock)
    async with app.run_test(size=size) as pilot:
        await settle(pilot)
        for step in SCREENS[screen]:
            if callable(step):
                step(pilot)
            else:
                await pilot.press(step)
            await refresh_screen(pilot)
        lines = screen_lines(app)[:-1]  # the footer's own separator aside
        # The loss spark line's blocks are tested above, the trigger grid is made of pixels.
        dialog = {
            (y, x)
            for w in app.screen.query(".dialog")
            for y in range(w.region.y, w.region.bottom)
            for x in range(w.region.x, w.region.right)
        }  # a dialog over the jobs table gets no allowance from the table under it
        allowed = (
            border_cells(app) | drawn_by(app, "TriggerGrid") | (drawn_by(app, "JobsTable") - dialog)
        )
        strays = [
            (y, x, ch)
            for y, x, ch in stray_blocks(lines)
            if (y, x) not in allowed and not checkbox(lines[y], x)
        ]
        assert strays == [], "\n".join(lines)
