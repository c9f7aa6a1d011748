"""Snapshots of every screen in fixed states (FakeSource, frozen clock) at 80x24, one at 120x40.

Update after a deliberate change with ``pytest tests/tui/test_snapshots.py --snapshot-update`` and
look at ``snapshot_report.html`` before accepting.
"""

from __future__ import annotations

from textual.widgets import Input, SelectionList

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


def open_job(job_id: int):
    def step(pilot) -> None:
        pilot.app.open_job(job_id)

    return step


def test_jobs_80x24(snap_compare, snapshot_demo, clock):
    assert snap_compare(make_app(snapshot_demo, clock), run_before=run_before())


def test_jobs_120x40(snap_compare, snapshot_demo, clock):
    assert snap_compare(
        make_app(snapshot_demo, clock), terminal_size=(120, 40), run_before=run_before()
    )


def test_jobs_light_theme_no_engine(snap_compare, snapshot_demo, clock):
    snapshot_demo.set_engine(alive=False)
    app = make_app(snapshot_demo, clock, theme="textual-light")
    assert snap_compare(app, run_before=run_before())


def test_run_curves(snap_compare, snapshot_demo, clock):
    assert snap_compare(make_app(snapshot_demo, clock), run_before=run_before(open_job(2)))


def test_run_triggers(snap_compare, snapshot_demo, clock):
    assert snap_compare(make_app(snapshot_demo, clock), run_before=run_before(open_job(2), "2"))


def test_run_embedding(snap_compare, snapshot_demo, clock):
    assert snap_compare(make_app(snapshot_demo, clock), run_before=run_before(open_job(2), "3"))


def test_run_params(snap_compare, snapshot_demo, clock):
    assert snap_compare(make_app(snapshot_demo, clock), run_before=run_before(open_job(1), "4"))


def test_run_log(snap_compare, snapshot_demo, clock):
    assert snap_compare(make_app(snapshot_demo, clock), run_before=run_before(open_job(1), "5"))


def test_run_artifacts(snap_compare, snapshot_demo, clock):
    assert snap_compare(make_app(snapshot_demo, clock), run_before=run_before(open_job(1), "6"))


def test_new_form_with_field_error(snap_compare, snapshot_demo, clock):
    def bad_epochs(pilot) -> None:
        pilot.app.screen.query_one("#f-epochs", Input).value = "0"

    assert snap_compare(make_app(snapshot_demo, clock), run_before=run_before("n", bad_epochs))


def test_study(snap_compare, snapshot_demo, clock):
    assert snap_compare(make_app(snapshot_demo, clock), run_before=run_before("s"))


def test_compare(snap_compare, snapshot_demo, clock):
    def pick(pilot) -> None:
        chooser = pilot.app.screen.query_one("#compare-jobs", SelectionList)
        chooser.select(1)
        chooser.select(2)

    def key(pilot) -> None:
        pilot.app.screen.query_one("#compare-key").value = "train/loss"

    assert snap_compare(make_app(snapshot_demo, clock), run_before=run_before("m", pick, key))


def test_cancel_confirmation(snap_compare, snapshot_demo, clock):
    def to_running(pilot) -> None:
        table = pilot.app.screen.query_one("#jobs-table")
        table.move_cursor(row=table.get_row_index("2"))

    assert snap_compare(make_app(snapshot_demo, clock), run_before=run_before(to_running, "c"))


def test_help(snap_compare, snapshot_demo, clock):
    assert snap_compare(make_app(snapshot_demo, clock), run_before=run_before("question_mark"))
