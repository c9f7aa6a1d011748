"""Snapshots of every screen in fixed states (FakeSource, frozen clock) at 80x24, 120x40 and 60x20.

Update after a deliberate change with ``pytest tests/tui/test_snapshots.py --snapshot-update`` and
look at ``snapshot_report.html`` before accepting.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import Input, Select, SelectionList

from .conftest import make_app, refresh_screen, settle


def run_before(*steps):
    """A pilot script: strings are key presses, callables get the pilot; settles after each."""

    async def script(pilot) -> None:
        await settle(pilot)
        for step in steps:
            if callable(step):
                result = step(pilot)
                if result is not None:
                    await result
            else:
                await pilot.press(step)
            await refresh_screen(pilot)

    return script


SIZES = pytest.mark.parametrize(
    "size", [(80, 24), (120, 40), (60, 20)], ids=lambda size: f"{size[0]}x{size[1]}"
)


def open_job(job_id: int):
    def step(pilot) -> None:
        pilot.app.open_job(job_id)

    return step


@SIZES
def test_jobs(snap_compare, snapshot_demo, clock, size):
    assert snap_compare(make_app(snapshot_demo, clock), terminal_size=size, run_before=run_before())


def test_jobs_light_theme_no_engine(snap_compare, snapshot_demo, clock):
    snapshot_demo.set_engine(alive=False)
    app = make_app(snapshot_demo, clock, theme="textual-light")
    assert snap_compare(app, run_before=run_before())


@SIZES
def test_run_curves(snap_compare, snapshot_demo, clock, size):
    assert snap_compare(
        make_app(snapshot_demo, clock), terminal_size=size, run_before=run_before(open_job(2))
    )


@SIZES
def test_run_triggers(snap_compare, snapshot_demo, clock, size):
    assert snap_compare(
        make_app(snapshot_demo, clock), terminal_size=size, run_before=run_before(open_job(2), "2")
    )


@SIZES
def test_run_embedding(snap_compare, snapshot_demo, clock, size):
    assert snap_compare(
        make_app(snapshot_demo, clock), terminal_size=size, run_before=run_before(open_job(2), "3")
    )


@SIZES
def test_run_params(snap_compare, snapshot_demo, clock, size):
    assert snap_compare(
        make_app(snapshot_demo, clock), terminal_size=size, run_before=run_before(open_job(1), "4")
    )


@SIZES
def test_run_log(snap_compare, snapshot_demo, clock, size):
    assert snap_compare(
        make_app(snapshot_demo, clock), terminal_size=size, run_before=run_before(open_job(1), "5")
    )


@SIZES
def test_run_artifacts(snap_compare, snapshot_demo, clock, size):
    assert snap_compare(
        make_app(snapshot_demo, clock), terminal_size=size, run_before=run_before(open_job(1), "6")
    )


@SIZES
def test_new_form_with_field_error(snap_compare, snapshot_demo, clock, size):
    def bad_epochs(pilot) -> None:
        pilot.app.screen.query_one("#f-epochs", Input).value = "0"

    assert snap_compare(
        make_app(snapshot_demo, clock), terminal_size=size, run_before=run_before("n", bad_epochs)
    )


@SIZES
def test_study(snap_compare, snapshot_demo, clock, size):
    assert snap_compare(
        make_app(snapshot_demo, clock), terminal_size=size, run_before=run_before("s")
    )


@SIZES
def test_compare(snap_compare, snapshot_demo, clock, size):
    def pick(pilot) -> None:
        chooser = pilot.app.screen.query_one("#compare-jobs", SelectionList)
        chooser.select(1)
        chooser.select(2)

    assert snap_compare(
        make_app(snapshot_demo, clock), terminal_size=size, run_before=run_before("m", pick)
    )


def to_running(pilot) -> None:
    table = pilot.app.screen.query_one("#jobs-table")
    table.move_cursor(row=table.get_row_index("2"))


@SIZES
def test_cancel_confirmation(snap_compare, snapshot_demo, clock, size):
    assert snap_compare(
        make_app(snapshot_demo, clock), terminal_size=size, run_before=run_before(to_running, "c")
    )


@SIZES
def test_jobs_system_pane(snap_compare, snapshot_demo, clock, size):
    assert snap_compare(
        make_app(snapshot_demo, clock), terminal_size=size, run_before=run_before("y")
    )


@SIZES
def test_note_dialog(snap_compare, snapshot_demo, clock, size):
    def write(pilot) -> None:
        for field, text in (("#tags", "baseline paper"), ("#note", "loss spikes at step 200")):
            editor = pilot.app.screen.query_one(field, Input)
            editor.cursor_blink = False  # on a loaded machine the blink's phase is a race
            editor.value = text

    assert snap_compare(
        make_app(snapshot_demo, clock),
        terminal_size=size,
        run_before=run_before(to_running, "t", write),
    )


@SIZES
def test_filter_dialog(snap_compare, snapshot_demo, clock, size):
    def find(pilot) -> None:
        editor = pilot.app.screen.query_one("#find", Input)
        editor.cursor_blink = False  # as in the note dialog: no race with the blink
        editor.value = "baseline"

    assert snap_compare(
        make_app(snapshot_demo, clock), terminal_size=size, run_before=run_before("slash", find)
    )


@SIZES
def test_columns_dialog(snap_compare, snapshot_demo, clock, size):
    def choose(pilot) -> None:
        pilot.app.screen.query_one("#columns", SelectionList).deselect("study")
        pilot.app.screen.query_one("#sort", Select).value = "best"

    assert snap_compare(
        make_app(snapshot_demo, clock), terminal_size=size, run_before=run_before("o", choose)
    )


@SIZES
def test_jobs_sorted_by_a_column_of_the_users_choice(snap_compare, snapshot_demo, clock, size):
    def arrange(pilot) -> None:
        table = pilot.app.screen.query_one("#jobs-table")
        table.arrange([c for c in table.chosen if c != "kind"], "prog", True)

    assert snap_compare(
        make_app(snapshot_demo, clock), terminal_size=size, run_before=run_before(arrange)
    )


@SIZES
def test_run_curves_with_a_pinned_run(snap_compare, snapshot_demo, clock, size):
    def pin(pilot) -> None:
        pilot.app.toggle_pin(1)

    assert snap_compare(
        make_app(snapshot_demo, clock), terminal_size=size, run_before=run_before(pin, open_job(2))
    )


@SIZES
def test_help(snap_compare, snapshot_demo, clock, size):
    assert snap_compare(
        make_app(snapshot_demo, clock), terminal_size=size, run_before=run_before("question_mark")
    )


def with_learned_positions(source) -> None:
    """Give the demo search (job 2) a learned position distribution: a corner backdoor's pi."""
    import numpy as np

    search_dir = Path(source._workdirs[2])
    for i, beta in enumerate(("0.9", "0.8", "0.5")):
        pi = np.full((30, 30), 0.02 / 896, dtype=np.float32)
        pi[28:, 28:] = 0.98 / 4 - 0.05 * i
        pi[27, 27] = 0.2 * i
        np.save(search_dir / f"beta={beta}" / "positions.npy", pi / pi.sum(), allow_pickle=False)
        hits = np.zeros((30, 30), dtype=np.float32)
        hits[28:, 28:] = (6 - i, 3), (2, 1)
        np.save(search_dir / f"beta={beta}" / "landing.npy", hits, allow_pickle=False)


@pytest.mark.parametrize("size", [(120, 40), (80, 24)], ids=lambda size: f"{size[0]}x{size[1]}")
def test_run_triggers_position_map(snap_compare, snapshot_demo, clock, size):
    """The Triggers tab of a search with learned placement: per beta the heat map of pi and of
    where its valid triggers land, each with its legend, under the sampled triggers; scrolled
    down to it."""
    with_learned_positions(snapshot_demo)

    async def scroll(pilot) -> None:
        pilot.app.screen.query_one("#position-map").scroll_visible(animate=False)

    assert snap_compare(
        make_app(snapshot_demo, clock),
        terminal_size=size,
        run_before=run_before(open_job(2), "2", scroll),
    )
