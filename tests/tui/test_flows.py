"""Pilot tests: every binding and flow of the app, driven against the FakeSource."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import DataTable, Input, SelectionList, Static, TabbedContent

from engine.specs import PRESETS
from mesa_tui.screens.compare import CompareScreen
from mesa_tui.screens.jobs import JobsScreen
from mesa_tui.screens.modals import ConfirmModal, FilterModal, HelpModal, NoteModal
from mesa_tui.screens.new import NewJobScreen
from mesa_tui.screens.run import RunScreen
from mesa_tui.widgets.curves import CurvesPanel
from mesa_tui.widgets.jobs_table import JobsTable
from mesa_tui.widgets.trigger_grid import TriggerGrid

from .conftest import (
    make_app,
    open_study_screen,
    refresh_screen,
    settle,
    submit_form,
    wait_until,
)


def table_ids(app) -> list[int]:
    table = app.screen.query_one(JobsTable)
    return [int(table.get_row_at(i)[0].plain) for i in range(table.row_count)]


async def move_to(pilot, job_id: int) -> None:
    table = pilot.app.screen.query_one(JobsTable)
    table.move_cursor(row=table.get_row_index(str(job_id)))
    await pilot.pause()


async def test_jobs_table_fills_with_status_and_engine(demo, clock):
    app = make_app(demo, clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        assert isinstance(app.screen, JobsScreen)
        assert table_ids(app) == [5, 4, 3, 2, 1]
        bar = str(app.screen.query_one("#engine-bar", Static).render())
        assert "engine gpu-box" in bar and "slots 1/4" in bar and "gpu0 21/80G 87%" in bar


async def test_live_update_changes_a_row_and_adds_new_jobs(demo, clock):
    app = make_app(demo, clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        clock.advance(5)
        demo.update_job(2, progress=0.9, eta_s=30.0)
        demo.add_job("train", "queued", spec={"kind": "train", "trigger": "bw:1"})
        await refresh_screen(pilot)
        table = app.screen.query_one(JobsTable)
        assert table_ids(app)[0] == 6
        assert table.get_row("2")[5].plain == "90%"


async def test_submit_from_form_refuses_bad_field_then_job_appears(demo, clock):
    app = make_app(demo, clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("n")
        await settle(pilot)
        form = app.screen
        assert isinstance(form, NewJobScreen)
        epochs = form.query_one("#f-epochs", Input)
        epochs.value = "0"
        error = form.query_one("#e-epochs", Static)
        await wait_until(pilot, lambda: error.has_class("shown"))
        assert "greater than or equal to 1" in str(error.render())
        assert error.has_class("shown") and epochs.has_class("invalid")
        await pilot.press("ctrl+s")
        await settle(pilot)
        assert isinstance(app.screen, NewJobScreen)
        assert not [c for c in demo.calls if c[0] == "submit"]
        epochs.value = "3"
        form.query_one("#study", Input).value = "mini"
        await wait_until(pilot, lambda: not error.has_class("shown"))
        await pilot.press("ctrl+s")
        await settle(pilot)
        assert isinstance(app.screen, JobsScreen)
        kind, spec = next(c[1] for c in demo.calls if c[0] == "submit")
        assert kind == "train" and spec["epochs"] == 3 and spec["kind"] == "train"
        assert table_ids(app)[0] == 6


async def test_form_preset_fills_fields_and_escape_goes_back(demo, clock):
    app = make_app(demo, clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("n")
        await settle(pilot)
        form = app.screen
        preset = PRESETS["train"]["cpu-quick"]
        form.query_one("#preset").value = "cpu-quick"
        batch = form.query_one("#f-batch_size", Input)
        await wait_until(pilot, lambda: batch.value == str(preset["batch_size"]))
        assert form.query_one("#f-lr", Input).value == str(preset["lr"])
        assert form.query_one("#f-epochs", Input).value == str(preset["epochs"])
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, JobsScreen)


async def test_cancel_asks_first_then_cancels(demo, clock):
    app = make_app(demo, clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await move_to(pilot, 2)
        await pilot.press("c")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmModal)
        await pilot.press("n")
        await settle(pilot)
        assert ("cancel", 2) not in demo.calls
        await pilot.press("c")
        await pilot.pause()
        await pilot.press("y")
        await settle(pilot)
        assert ("cancel", 2) in demo.calls
        assert app.screen.query_one(JobsTable).get_row("2")[4].plain == "cancelled"


async def test_retry_and_delete(demo, clock):
    app = make_app(demo, clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await move_to(pilot, 4)
        await pilot.press("r")
        await settle(pilot)
        assert ("retry", 4) in demo.calls
        assert app.screen.query_one(JobsTable).get_row("4")[4].plain == "queued"
        await move_to(pilot, 5)
        await pilot.press("d")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmModal)
        await pilot.press("y")
        await settle(pilot)
        assert 5 not in table_ids(app)


async def test_refusals_are_notices_not_crashes(demo, clock):
    app = make_app(demo, clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await move_to(pilot, 1)
        await pilot.press("c", "r")
        await move_to(pilot, 2)
        await pilot.press("d")
        await settle(pilot)
        assert isinstance(app.screen, JobsScreen)
        messages = [n.message for n in app._notifications]
        assert any("already succeeded" in m for m in messages)
        assert any("cancel it before deleting" in m for m in messages)
        demo.fail_next = RuntimeError("database is locked")
        await refresh_screen(pilot)
        assert any("database is locked" in n.message for n in app._notifications)
        assert app.is_running


async def test_open_run_and_switch_every_tab(demo, clock):
    app = make_app(demo, clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await move_to(pilot, 2)
        await pilot.press("enter")
        await settle(pilot)
        run = app.screen
        assert isinstance(run, RunScreen) and run.job_id == 2
        await refresh_screen(pilot)
        assert "mesa/beta=0.9/hinge" in run.series.series
        assert run.series.series["mesa/beta=0.9/hinge"].n == 26
        tabs = run.query_one("#tabs", TabbedContent)
        for key, tab in zip(
            "123456", ("curves", "triggers", "embedding", "params", "log", "artifacts"), strict=True
        ):
            await pilot.press(key)
            await pilot.pause()
            assert tabs.active == tab
        await pilot.press("right_square_bracket")
        await pilot.pause()
        assert tabs.active == "curves"
        assert set(run.query_one(TriggerGrid).by_beta) == {"0.9", "0.8", "0.5"}
        assert run.query_one(TriggerGrid).original is not None
        assert run.query_one("#trigger-stats", DataTable).row_count == 5
        assert run.query_one("#log-view").lines
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, JobsScreen)


async def test_curves_follow_new_points_and_series_choice(demo, clock):
    app = make_app(demo, clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        app.open_job(2)
        await refresh_screen(pilot)
        run = app.screen
        panel = run.query_one(CurvesPanel)
        assert "train/loss" in panel.selected() and "mesa/beta=0.9/validity" not in panel.selected()
        run_id = demo.run_ids(2)[0]
        demo.log_metrics(run_id, 260, {"mesa/beta=0.9/hinge": 0.89})
        await refresh_screen(pilot)
        assert run.series.series["mesa/beta=0.9/hinge"].last() == pytest.approx(0.89)
        assert panel.drawn_versions() == {2: run.series.version}
        chooser = run.query_one("#series", SelectionList)
        chooser.deselect("train/loss")
        await pilot.pause()
        assert "train/loss" not in panel.selected()
        run.redraw()
        await settle(pilot, 1)
        assert "loss" not in panel.panels()  # no plot without a series


async def test_run_screen_cancel_with_confirmation(demo, clock):
    app = make_app(demo, clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        app.open_job(2)
        await settle(pilot)
        await pilot.press("c")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmModal)
        await pilot.press("y")
        await settle(pilot)
        assert ("cancel", 2) in demo.calls
        assert isinstance(app.screen, RunScreen)


async def test_filter_by_status(demo, clock):
    app = make_app(demo, clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("slash")
        await pilot.pause()
        modal = app.screen
        assert isinstance(modal, FilterModal)
        modal.query_one("#statuses", SelectionList).select("running")
        await pilot.press("ctrl+s")
        await settle(pilot)
        assert table_ids(app) == [2]
        assert "status running" in str(app.screen.query_one("#filter-line", Static).render())
        await pilot.press("slash")
        await pilot.pause()
        await pilot.press("ctrl+x")
        await settle(pilot)
        assert len(table_ids(app)) == 5


async def test_note_and_tags_are_saved_then_found_by_the_filter(demo, clock):
    app = make_app(demo, clock)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        await move_to(pilot, 3)
        await pilot.press("t")
        await pilot.pause()
        assert isinstance(app.screen, NoteModal)
        app.screen.query_one("#tags", Input).value = "two words,"  # a comma ends a tag
        app.screen.query_one("#note", Input).value = "loss spikes at epoch 3"
        await pilot.press("ctrl+s")
        await settle(pilot)
        assert demo.calls[-1] == ("annotate", (3, "loss spikes at epoch 3", ("two", "words")))
        await refresh_screen(pilot)
        note = app.screen.query_one(JobsTable).get_row("3")[-1].plain
        assert note.startswith("#two #wor")  # 10 cells wide at 120 columns
        await pilot.press("slash")
        await pilot.pause()
        app.screen.query_one("#find", Input).value = "SPIKES"
        await pilot.press("ctrl+s")
        await settle(pilot)
        assert table_ids(app) == [3]
        assert "finding 'SPIKES'" in str(app.screen.query_one("#filter-line", Static).render())


async def test_a_tag_that_is_not_one_word_is_said_in_the_dialog(demo, clock):
    app = make_app(demo, clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("t")
        await pilot.pause()
        app.screen.query_one("#tags", Input).value = "x" * 61
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, NoteModal)  # still open, saying why
        assert "not one word" in str(app.screen.query_one("#note-error").render())
        await pilot.press("escape")
        await pilot.pause()
        assert not any(call[0] == "annotate" for call in demo.calls)


async def test_system_pane_shows_each_slot_of_the_engine(demo, clock):
    from mesa_tui.widgets.system_pane import SystemPane
    from store.entities import GpuInfo

    app = make_app(demo, clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        pane = app.screen.query_one(SystemPane)
        assert not pane.display
        await pilot.press("y")
        await refresh_screen(pilot)
        rows = [[str(c) for c in pane.get_row_at(i)] for i in range(pane.row_count)]
        assert rows[0][:3] == ["gpu-box", "1/4", "41%/16"]
        assert rows[1][:7] == ["  slot 0", "2", "97%", "3.0G", "gpu0", "21/80G", "87%"]
        assert rows[2][1:5] == ["idle", "", "", "none"]  # a CPU slot: no GPU, said so
        demo.set_engine(alive=True, gpus=(GpuInfo(0, "gpu 0"),))  # no NVML figures
        await refresh_screen(pilot)
        assert [str(c) for c in pane.get_row_at(1)][4:6] == ["gpu0", ""]
        demo.set_engine(alive=False)
        await refresh_screen(pilot)
        assert str(pane.get_row_at(0)[0]) == "no engine running"


async def test_help_lists_bindings_and_closes(demo, clock):
    app = make_app(demo, clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpModal)
        described = {d for _, d in app.screen.rows}
        assert {"new", "cancel", "retry", "delete", "filter", "columns/sort", "quit"} <= described
        assert ("^q, q", "quit") in app.screen.rows  # keys that do the same share a row
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, JobsScreen)


async def test_dead_engine_offers_to_start_one(tmp_path, clock):
    from mesa_tui.demo import demo_source

    source = demo_source(tmp_path, clock)
    source.set_engine(alive=False)
    app = make_app(source, clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        assert "no engine running" in str(app.screen.query_one("#engine-bar", Static).render())
        await pilot.press("e")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmModal)
        await pilot.press("y")
        await settle(pilot)
        assert ("start_engine", None) in source.calls
        await refresh_screen(pilot)
        assert "● engine" in str(app.screen.query_one("#engine-bar", Static).render())


async def test_study_sorts_and_opens_the_run(demo, clock):
    app = make_app(demo, clock)
    async with app.run_test(size=(80, 24)) as pilot:
        study = await open_study_screen(pilot)
        table = study.query_one("#study-table", DataTable)
        assert table.row_count == 4
        table.move_cursor(row=0, column=4)
        await pilot.press("o", "o")
        await pilot.pause()
        assert table.get_row_at(0)[0] == "bw:86"
        summary = study.query_one("#study-summary", DataTable)
        assert [summary.get_row_at(r)[0] for r in range(summary.row_count)] == [
            "mean", "95% ci", "worst", "clean acc", "paper mean", "paper worst"
        ]  # fmt: skip
        assert summary.get_row_at(4)[1].plain.strip() == "2.4"
        # The mean, its interval and the worst are the study's statistics (stats.summarize).
        statistics = demo.study_summary("mini").statistics
        for column, method in enumerate(demo.study_summary("mini").methods, start=1):
            found = statistics["methods"][method]
            mean, worst = found["asr_mean"], found["worst"]["asr"]
            assert summary.get_row_at(0)[column].plain.strip() == f"{100 * mean['mean']:.1f}"
            interval = f"{100 * mean['lo']:.1f}–{100 * mean['hi']:.1f}"
            assert summary.get_row_at(1)[column].plain.strip() == interval
            assert summary.get_row_at(2)[column].plain.strip() == f"{100 * worst:.1f}"
        await pilot.press("enter")
        await settle(pilot)
        assert isinstance(app.screen, RunScreen) and app.screen.job_id == 2


async def test_compare_overlays_chosen_jobs(demo, clock):
    app = make_app(demo, clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("m")
        await settle(pilot)
        compare = app.screen
        assert isinstance(compare, CompareScreen)
        chooser = compare.query_one("#compare-jobs", SelectionList)
        chooser.select(1)
        chooser.select(2)
        await refresh_screen(pilot)
        assert app.pins == [1, 2]  # what compare picks is pinned on the run screens too
        assert compare.series[1].series["train/loss"].n == 8
        await refresh_screen(pilot)
        loss = compare.query_one(CurvesPanel).panels()["train/loss"]
        assert [colour for *_, colour in loss.lines] == [app.colour_of(1), app.colour_of(2)]
        await pilot.press("j")
        await pilot.pause()
        assert isinstance(app.screen, JobsScreen)


async def test_theme_toggle_and_quit(demo, clock):
    app = make_app(demo, clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("ctrl+t")
        assert app.theme == "textual-light"
        await pilot.press("ctrl+t")
        assert app.theme == "textual-dark"
        await pilot.press("q")
        await pilot.pause()
    assert app.return_code == 0


async def test_pipeline_form_refuses_a_bad_method_then_queues_every_stage(demo, clock):
    app = make_app(demo, clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("n")
        await settle(pilot)
        form = app.screen
        form.query_one("#kind").value = "pipeline"
        await wait_until(pilot, lambda: "methods" in form.editors)
        form.editors["methods"].value = "mesa,bogus"
        await wait_until(pilot, lambda: form.error_labels["methods"].has_class("shown"))
        assert "bogus" in str(form.error_labels["methods"].render())
        form.editors["methods"].value = "mesa,ideal"
        kind, spec = await submit_form(pilot, form, demo)
        assert kind == "pipeline" and spec["methods"] == "mesa,ideal" and spec["target"] == "auto"
        assert table_ids(app)[:5] == [10, 9, 8, 7, 6]


async def test_position_map_shows_where_learned_triggers_land(demo, clock):
    """A search with learned placement writes beta=*/positions.npy and landing.npy: the Triggers
    tab draws per beta the heat map of pi and of where its evaluated stamps hit the target, each
    with its legend (the top offset, its mass, the spread); a search at random places has no map
    and the widget stays hidden."""
    import numpy as np

    from mesa_tui.widgets.position_map import PositionMap, heat_lines, legend

    app = make_app(demo, clock)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        app.open_job(2)
        await refresh_screen(pilot)
        run = app.screen
        assert isinstance(run, RunScreen)
        assert not run.query_one(PositionMap).display  # the demo search: per-image
        search_dir = Path(demo._workdirs[2])
        pi = np.full((30, 30), 0.1 / 899, dtype=np.float32)
        pi[29, 29] = 0.9
        hits = np.zeros((30, 30), dtype=np.float32)
        hits[29, 28:] = (30, 10)  # 40 hits, three quarters one column in from the corner
        for beta in ("0.9", "0.8", "0.5"):
            np.save(search_dir / f"beta={beta}" / "positions.npy", pi, allow_pickle=False)
            landing = hits if beta != "0.5" else np.zeros_like(hits)  # 0.5: nothing hit
            np.save(search_dir / f"beta={beta}" / "landing.npy", landing, allow_pickle=False)
            (search_dir / f"beta={beta}" / "samples.npy").touch()  # newer: read again
        run.samples_stamp = 0.0
        run.polls = 0
        await refresh_screen(pilot)
        await pilot.press("2")
        await pilot.pause()
        widget = run.query_one(PositionMap)
        assert widget.display and set(widget.by_beta) == {"0.9", "0.8", "0.5"}
        assert widget.by_beta["0.9"].shape == (30, 30) and set(widget.landing) == set(
            widget.by_beta
        )
        drawn = "\n".join(line.plain for line in widget._build(120))
        assert "β=0.9 hits" in drawn and "top (29,28) 75%" in drawn
        assert "no evaluated stamp" in drawn  # beta 0.5's stamps hit nothing
    lines = heat_lines(pi)
    assert len(lines) == 15 and lines[0].cell_len == 30
    bar, info = legend(pi)
    assert "90.0%" in bar.plain and "top (29,29) 90%" in info.plain
