"""The jobs table's columns and order: chosen with o (or a click on a header), sorted by any
column, kept in the app's config for the next start; best and last ASR side by side."""

from __future__ import annotations

import math
import os
import tomllib
from datetime import UTC, datetime

import pytest
from textual.widgets import Checkbox, Select, SelectionList, Static

from mesa_tui.config import AppConfig, JobsView, dumps
from mesa_tui.demo import FakeSource, job_summary
from mesa_tui.screens.modals import ColumnsModal
from mesa_tui.source import JobQuery, JobRow
from mesa_tui.widgets.jobs_table import (
    COLUMNS,
    PADDING,
    SORT_VALUES,
    JobsTable,
    chosen_columns,
    known_order,
    sort_key,
)

from .conftest import make_app, refresh_screen, settle


def table_ids(app) -> list[int]:
    table = app.screen.query_one(JobsTable)
    return [int(table.get_row_at(i)[0].plain) for i in range(table.row_count)]


def rows_of(source: FakeSource) -> dict[int, JobRow]:
    return {r.id: r for r in source.jobs(JobQuery(), None).rows}


def filter_line(app) -> str:
    return str(app.screen.query_one("#filter-line", Static).render())


async def test_columns_and_order_are_saved_and_the_next_app_starts_with_them(demo, clock, tmp_path):
    path = tmp_path / "config" / "app.toml"
    app = make_app(demo, clock, config=AppConfig.load(path))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        await pilot.press("o")
        await pilot.pause()
        dialog = app.screen
        assert isinstance(dialog, ColumnsModal)
        dialog.query_one("#columns", SelectionList).deselect("kind")
        dialog.query_one("#columns", SelectionList).deselect("study")
        dialog.query_one("#sort", Select).value = "trigger"
        dialog.query_one("#descending", Checkbox).value = False
        await pilot.press("ctrl+s")
        await settle(pilot)
        table = app.screen.query_one(JobsTable)
        assert "kind" not in table.widths and "study" not in table.widths
        assert {"id", "method", "best", "note"} <= set(table.widths)
        assert "sorted by trigger, ascending" in filter_line(app)
        # bw:7 before bw:170 (numbers by value), the newest first among equals
        assert table_ids(app) == [4, 3, 2, 1, 5]
        assert [rows_of(demo)[i].trigger for i in table_ids(app)][:2] == ["bw:7", "bw:170"]
    saved = tomllib.loads(path.read_text())["jobs"]
    assert saved["sort"] == "trigger" and saved["descending"] is False
    assert "kind" not in saved["columns"] and "method" in saved["columns"]

    again = make_app(demo, clock, config=AppConfig.load(path))
    async with again.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        table = again.screen.query_one(JobsTable)
        assert "kind" not in table.widths and table.sort_column == "trigger"
        assert "sorted by trigger, ascending" in filter_line(again)
        await pilot.press("o")
        await pilot.pause()
        every = [c.key for c in COLUMNS if c.key != "id"]
        for key in every:
            again.screen.query_one("#columns", SelectionList).select(key)
        again.screen.query_one("#sort", Select).value = "id"
        again.screen.query_one("#descending", Checkbox).value = True
        await pilot.press("ctrl+s")
        await settle(pilot)
        assert filter_line(again) == "all jobs"  # newest first says nothing
    saved = tomllib.loads(path.read_text())["jobs"]
    assert "columns" not in saved  # every column: a column added later shows too


async def test_escape_leaves_columns_and_order_as_they_were(demo, clock, tmp_path):
    path = tmp_path / "app.toml"
    app = make_app(demo, clock, config=AppConfig.load(path))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("o")
        await pilot.pause()
        app.screen.query_one("#columns", SelectionList).deselect("method")
        await pilot.press("escape")
        await settle(pilot)
        assert "method" in app.screen.query_one(JobsTable).widths
    assert not path.exists()


async def test_a_click_on_a_header_sorts_by_it_and_again_the_other_way(demo, clock):
    app = make_app(demo, clock)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        table = app.screen.query_one(JobsTable)
        offsets, x = {}, 0
        for key, w in table.widths.items():
            offsets[key] = x + 1
            x += w + PADDING
        await pilot.click(JobsTable, offset=(offsets["status"], 0))
        await settle(pilot)
        statuses = [rows_of(demo)[i].status for i in table_ids(app)]
        assert statuses == ["queued", "running", "succeeded", "failed", "cancelled"]
        await pilot.click(JobsTable, offset=(offsets["status"], 0))
        await settle(pilot)
        assert table.sort_column == "status" and table.descending
        assert [rows_of(demo)[i].status for i in table_ids(app)] == statuses[::-1]
        await pilot.click(JobsTable, offset=(offsets["prog"], 0))
        await settle(pilot)
        progress = [rows_of(demo)[i].progress for i in table_ids(app)]
        assert progress == [1.0, 0.42, 0.25, 0.1, None]  # high first, none last
        assert "sorted by prog, descending" in filter_line(app)


@pytest.mark.parametrize("descending", [True, False])
async def test_every_column_sorts_with_missing_values_last(demo, clock, descending):
    demo.update_job(3, note="zz last word", tags=("a",))
    app = make_app(demo, clock)
    async with app.run_test(size=(160, 40)) as pilot:
        await settle(pilot)
        table = app.screen.query_one(JobsTable)
        rows = rows_of(demo)
        for column in SORT_VALUES:
            table.arrange(table.chosen, column, descending)
            await pilot.pause()
            want = sorted(rows.values(), key=sort_key(column, descending), reverse=descending)
            assert table_ids(app) == [r.id for r in want], column
            values = [SORT_VALUES[column](r) for r in want]
            present = [v for v in values if v is not None]
            assert values[: len(present)] == present  # missing values come last either way
            assert present == sorted(present, reverse=descending), column


async def test_the_cursor_stays_on_its_job_when_a_new_value_moves_the_row(demo, clock):
    app = make_app(demo, clock)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        table = app.screen.query_one(JobsTable)
        table.arrange(table.chosen, "prog", True)
        await pilot.pause()
        table.move_cursor(row=table.get_row_index("4"))  # failed at 25 %
        clock.advance(5)
        demo.update_job(2, progress=0.05)  # the running job falls below it
        await refresh_screen(pilot)
        assert table_ids(app) == [1, 4, 5, 2, 3]
        assert table.selected_job().id == 4
        clock.advance(5)
        demo.add_job("train", "running", spec={"kind": "train"}, progress=0.99)
        await refresh_screen(pilot)
        assert table_ids(app)[:2] == [1, 6] and table.selected_job().id == 4


async def test_best_and_last_asr_of_a_defense_and_an_attack(clock):
    source = FakeSource(clock)
    defend = source.add_job("defend", "running", spec={"kind": "defend", "method": "anp"})
    train = source.add_job("train", "running", spec={"kind": "train"})
    for job, values in ((defend, (0.9, 0.05, 0.2)), (train, (0.5, 0.97, 0.9))):
        (run,) = source.run_ids(job)
        for step, value in enumerate(values):
            source.log_metrics(run, step, {"eval/asr": value})
    app = make_app(source, clock)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        table = app.screen.query_one(JobsTable)
        assert {"asr", "best"} <= set(table.widths)
        cells = {
            job: (table.get_cell(str(job), "asr").plain, table.get_cell(str(job), "best").plain)
            for job in (defend, train)
        }
        assert cells == {defend: ("20.0", "5.0"), train: ("90.0", "97.0")}
        table.arrange(table.chosen, "best", False)
        await pilot.pause()
        assert table_ids(app) == [defend, train]


def test_a_damaged_config_is_reported_and_left_alone(tmp_path):
    path = tmp_path / "app.toml"
    path.write_text("[jobs\ncolumns = 3\n")
    config = AppConfig.load(path)
    assert config.problem and str(path) in config.problem
    assert config.jobs == JobsView()
    config.save_jobs_view(JobsView(("id", "method"), "asr", False))
    assert path.read_text() == "[jobs\ncolumns = 3\n"


def test_the_config_keeps_what_it_does_not_know_and_ignores_wrong_types(tmp_path):
    path = tmp_path / "app.toml"
    path.write_text('theme = "light"\n[jobs]\nsort = 3\nwidth = 7\n[later]\nx = [1, 2]\n')
    config = AppConfig.load(path)
    assert config.jobs == JobsView()  # sort = 3 is not a column
    config.save_jobs_view(JobsView(("id", "asr"), "asr", False))
    data = tomllib.loads(path.read_text())
    assert data == {
        "theme": "light",
        "jobs": {"sort": "asr", "width": 7, "columns": ["id", "asr"], "descending": False},
        "later": {"x": [1, 2]},
    }
    assert AppConfig.load(path).jobs == JobsView(("id", "asr"), "asr", False)


def test_a_config_with_values_of_the_wrong_type_says_which_in_one_line_and_is_repaired(tmp_path):
    path = tmp_path / "app.toml"
    path.write_text('[jobs]\ncolumns = "asr"\nsort = 3\ndescending = "yes"\n')
    config = AppConfig.load(path)
    assert config.jobs == JobsView()
    assert config.problem is not None and "\n" not in config.problem
    for named in (str(path), "jobs.columns", "jobs.sort", "jobs.descending"):
        assert named in config.problem
    assert config.save_jobs_view(JobsView(("id", "asr"), "asr", False)) is None
    again = AppConfig.load(path)  # the bad values were replaced
    assert again.problem is None and again.jobs == JobsView(("id", "asr"), "asr", False)


def test_a_jobs_key_that_is_not_a_table_is_reported_and_replaced_without_a_crash(tmp_path):
    path = tmp_path / "app.toml"
    path.write_text('jobs = 3\ntheme = "light"\n')
    config = AppConfig.load(path)
    assert config.jobs == JobsView() and "jobs = 3 is not a table" in (config.problem or "")
    assert config.save_jobs_view(JobsView(None, "best", False)) is None
    assert tomllib.loads(path.read_text()) == {
        "theme": "light",
        "jobs": {"sort": "best", "descending": False},
    }


def test_a_write_that_fails_is_reported_not_raised_and_the_old_file_stays(tmp_path, monkeypatch):
    path = tmp_path / "app.toml"
    config = AppConfig.load(path)
    assert config.save_jobs_view(JobsView(("id",), "kind", False)) is None
    before = path.read_text()

    def no_room(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_room)
    problem = config.save_jobs_view(JobsView(None, "asr", True))
    assert problem is not None and "No space left on device" in problem and str(path) in problem
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.toml"]  # no temporary file left


def test_a_config_home_that_is_not_a_directory_is_reported_at_start_and_at_a_save(tmp_path):
    (tmp_path / "not-a-dir").write_text("")
    config = AppConfig.load(tmp_path / "not-a-dir" / "app.toml")
    assert config.problem is not None and "Not a directory" in config.problem
    later = AppConfig.load(tmp_path / "home" / "app.toml")  # fine at start, broken after
    (tmp_path / "home").write_text("")
    assert later.save_jobs_view(JobsView(None, "asr", True)) is not None
    assert later.jobs == JobsView(None, "asr", True)  # kept for this sitting all the same


def test_a_save_keeps_what_another_app_wrote_since_this_one_started(tmp_path):
    path = tmp_path / "app.toml"
    path.write_text('[jobs]\nsort = "asr"\n')
    config = AppConfig.load(path)
    path.write_text('[jobs]\nsort = "asr"\n[later]\nx = 1\n')
    config.save_jobs_view(JobsView(None, "kind", False))
    assert tomllib.loads(path.read_text())["later"] == {"x": 1}


def test_the_toml_written_reads_back_as_it_was():
    data = {
        "name": 'emoji \U0001f600, accents é, "quotes", \\, tab\t, del\x7f',
        "numbers": [1, -2, 0.5, 1e-05, 1e100, math.inf, -math.inf],
        "when": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC).date(),
        "jobs": {"columns": ["id", "asr"], "sort": "asr", "descending": False},
        "nested": {"inner": {"a key": [1, 2], "b": {"c": True}}},
        "array of tables": [{"a": 1}, {"a": 2}],
    }
    assert tomllib.loads(dumps(data)) == data


def test_unknown_column_names_are_ignored_and_an_unknown_sort_is_newest_first():
    every = tuple(c.key for c in COLUMNS)
    assert chosen_columns(None) == every
    assert chosen_columns(["asr", "renamed", "method"]) == ("id", "method", "asr")
    assert chosen_columns(["gone", "renamed"]) == every  # a config of another version
    assert chosen_columns([]) == ("id",)
    assert known_order("gone", False) == ("id", True)
    assert known_order("trigger", False) == ("trigger", False)


def test_text_sorts_by_the_numbers_in_it_and_nan_counts_as_missing():
    when = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [
        JobRow(job_summary(1, "train", "succeeded", when, trigger="bw:170"), asr=math.nan),
        JobRow(job_summary(2, "train", "succeeded", when, trigger="BW:85"), asr=0.5),
        JobRow(job_summary(3, "train", "succeeded", when, trigger="bw:11"), asr=None),
        JobRow(job_summary(4, "train", "succeeded", when, trigger="bw:85"), asr=0.5),
    ]
    by_trigger = sorted(rows, key=sort_key("trigger", False))
    assert [r.id for r in by_trigger] == [3, 4, 2, 1]  # equal values: newest first
    for descending in (True, False):
        by_asr = sorted(rows, key=sort_key("asr", descending), reverse=descending)
        assert [r.id for r in by_asr] == [4, 2, 3, 1]  # NaN and None last, newest first


async def test_the_app_says_once_why_it_did_not_use_its_config(demo, clock, tmp_path):
    path = tmp_path / "app.toml"
    path.write_text("[jobs\n")
    app = make_app(demo, clock, config=AppConfig.load(path))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        messages = [n.message for n in app._notifications]
        assert len([m for m in messages if str(path) in m]) == 1
        assert app.screen.query_one(JobsTable).chosen == tuple(c.key for c in COLUMNS)
