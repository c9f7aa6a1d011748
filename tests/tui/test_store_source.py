"""The app over the real store (SQLite in the test's own MESA_TUI_HOME), written to as the engine does."""

from __future__ import annotations

import time

import numpy as np
import pytest
from textual.widgets import Input

from mesa_tui.screens.jobs import JobsScreen
from mesa_tui.screens.modals import ConfirmModal
from mesa_tui.screens.run import RunScreen
from mesa_tui.source import JobQuery, StoreSource, open_store_source, utc_now
from mesa_tui.widgets.jobs_table import JobsTable
from mesa_tui.widgets.trigger_grid import TriggerGrid

from .conftest import SLOW, open_study_screen, refresh_screen, settle, wait_until


@pytest.fixture
def store_source(tmp_path) -> StoreSource:
    from store.repository import RunEvents

    source = open_store_source()
    store = source.store
    workdir = tmp_path / "search"
    (workdir / "beta=0.9").mkdir(parents=True)
    samples = np.random.default_rng(0).random((16, 3, 3, 3), dtype=np.float32)
    np.save(workdir / "beta=0.9" / "samples.npy", samples, allow_pickle=False)
    job_id, run_id = store.start_foreground(
        "mesa",
        {"kind": "mesa", "trigger": "bw:170", "steps": 100},
        "0" * 64,
        label="bw:170",
        host="test-host",
        pid=1,
        code_version="test",
        workdir=str(workdir),
    )
    events = RunEvents(run_id, job_id)
    now = time.time()
    for step in range(20):
        events.metrics.append(("mesa/beta=0.9/hinge", step, 0.04 * step, now))
        events.metrics.append(("train/loss", step, 2.0 / (1 + step), now))
    events.logs.append(("info", "search started", now))
    events.progress = {
        "stage": "search",
        "done": 20,
        "total": 100,
        "info": {},
        "wall_time": now,
        "started": now - 10,
    }
    store.record_events([events])
    return source


def make_store_app(source):
    from mesa_tui.app import create_app

    return create_app(source, utc_now, poll_s=SLOW, metrics_poll_s=SLOW, redraw_s=SLOW)


def test_store_source_reads_what_the_engine_writes(store_source):
    page = store_source.jobs(JobQuery(), None)
    (row,) = page.rows
    assert row.status == "running" and row.progress == pytest.approx(0.2)
    assert row.eta_s == pytest.approx(40.0) and len(row.loss_tail) == 20
    detail = store_source.job_detail(row.id)
    assert detail.latest["mesa/beta=0.9/hinge"] == pytest.approx(0.76)
    points = store_source.metric_points(detail.run_ids, 0)
    assert len(points) == 40 and points == sorted(points, key=lambda p: p.id)
    assert store_source.metric_points(detail.run_ids, points[-1].id) == []
    assert [line.message for line in store_source.logs(detail.run_ids, 0)] == ["search started"]
    assert store_source.engine_status().alive is False


async def test_app_over_the_store_submit_open_cancel(store_source):
    app = make_store_app(store_source)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        table = app.screen.query_one(JobsTable)
        assert table.row_count == 1
        app.open_job(1)
        await refresh_screen(pilot)
        run = app.screen
        assert isinstance(run, RunScreen)
        assert run.series.series["train/loss"].n == 20
        assert set(run.query_one(TriggerGrid).by_beta) == {"0.9"}
        await pilot.press("escape")
        await pilot.press("n")
        await settle(pilot)
        app.screen.query_one("#f-epochs", Input).value = "2"
        form = app.screen
        await wait_until(
            pilot, lambda: form.values().get("epochs") == "2" and not form.validation_pending
        )
        await pilot.press("ctrl+s")
        await settle(pilot)
        assert isinstance(app.screen, JobsScreen)
        submitted = store_source.store.job(2)
        assert submitted.status == "queued" and submitted.spec["epochs"] == 2
        await refresh_screen(pilot)
        table.move_cursor(row=table.get_row_index("2"))
        await pilot.press("c")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmModal)
        await pilot.press("y")
        await settle(pilot)
        assert store_source.store.job(2).status == "cancelled"
        await refresh_screen(pilot)
        assert table.get_row("2")[4].plain == "cancelled"


def test_store_source_submits_a_pipeline_with_its_dependencies(store_source):
    ids = store_source.submit(
        "pipeline",
        {
            "preset": "cpu-quick",
            "trigger": "bw:170",
            "target": "0",
            "methods": "mesa,finetune",
            "seed": 0,
        },
    )
    kinds = [store_source.store.job(i).kind for i in ids]
    assert kinds == ["train", "mesa", "defend", "defend"]
    mesa = store_source.job_detail(ids[1])
    assert mesa.depends_on == (ids[0],) and mesa.spec["model"] == f"job:{ids[0]}"


def test_rows_show_the_jobs_own_trigger_and_target_never_one_in_their_label(store_source):
    """A repair whose spec names no trigger shows its attack's (the store's field); a job
    whose label names a trigger it does not have shows none; the method is the label before the
    job's own trigger."""
    from store.entities import NewJob

    store = store_source.store
    attack, repair, by_path = store.submit(
        [
            NewJob("train", {"trigger": "bw:85", "target": 3}, "a", label="attack"),
            NewJob(
                "defend",
                {"model": "job:#0", "method": "point"},
                "b",
                label="point #3 bw:85 -> 3",
                depends_on=(("#0", "model"),),
            ),
            NewJob("defend", {"model": "/m", "method": "finetune"}, "c", label="ft bw:7 -> 0"),
        ]
    )
    rows = {r.id: r for r in store_source.jobs(JobQuery(), None).rows}
    assert (rows[attack].trigger, rows[attack].target, rows[attack].method) == (
        "bw:85",
        3,
        "attack",
    )
    assert (rows[repair].trigger, rows[repair].target, rows[repair].method) == (
        "bw:85",
        3,
        "point #3",
    )
    assert (rows[by_path].trigger, rows[by_path].target) == (None, None)
    assert rows[by_path].method == "finetune"  # its label's bw:7 is not its trigger


def summary_rows(screen) -> dict:
    """The study screen's summary table: its rows by their first cell."""
    from textual.widgets import DataTable

    table = screen.query_one("#study-summary", DataTable)
    return {table.get_row_at(r)[0]: table.get_row_at(r)[1:] for r in range(table.row_count)}


def assert_statistics(rows: dict, column: int, found: dict) -> None:
    """A method's column shows its mean, 95 % interval and worst as the statistics have them."""
    mean, worst = found["asr_mean"], found["worst"]["asr"]
    assert rows["mean"][column].plain.strip() == f"{100 * mean['mean']:.1f}"
    interval = f"{100 * mean['lo']:.1f}–{100 * mean['hi']:.1f}"
    assert rows["95% ci"][column].plain.strip() == interval
    assert rows["worst"][column].plain.strip() == f"{100 * worst:.1f}"


async def test_study_screen_over_the_store_shows_the_study_statistics(tmp_path):
    """The study screen over the real store: the mean, its 95 % interval and the worst of each
    method are the statistics `study show` prints (engine.report.study_stats), read in a worker;
    the cell under the cursor gets its line with the paired difference to MESA."""
    from textual.widgets import DataTable, Static

    from engine.report.study_stats import study_statistics
    from tests.report.small_study import make_small_study

    source = open_store_source()
    make_small_study(tmp_path / "artifacts", source.store)
    summary = source.study_summary("small")
    statistics = study_statistics(source.store, "small")
    assert summary.statistics == statistics and summary.statistics_error is None
    assert summary.methods == ("before repair", "mesa", "point", "ideal", "finetune")
    app = make_store_app(source)
    async with app.run_test(size=(80, 24)) as pilot:
        await open_study_screen(pilot)
        rows = summary_rows(app.screen)
        for column, method in enumerate(summary.methods):
            found = statistics["methods"].get(method)
            if found is None:  # before repair: no statistics, the attacks' own (none here)
                assert rows["95% ci"][column].plain.strip() == "–"
                continue
            assert_statistics(rows, column, found)
        grid_table = app.screen.query_one("#study-table", DataTable)
        trigger = summary.triggers[0]
        grid_table.move_cursor(row=0, column=1 + summary.methods.index("point"))
        await pilot.pause()
        detail = str(app.screen.query_one("#study-detail", Static).render())
        versus = statistics["per_trigger"][trigger]["versus_reference"]["point"]
        assert detail.startswith(f"{trigger} · point ") and "restarts" in detail
        assert f"mesa minus point {100 * versus['diff']:.1f} points" in detail


async def test_study_screen_lists_each_rate_of_a_result_folder_with_its_statistics(tmp_path):
    """A result folder of benchmarks/paper_study.py (``--results``) is listed beside the store's
    studies, one entry per stamping rate; its screen shows `study show FOLDER`'s numbers, clean
    accuracy included, and its export writes the folder's report."""
    import json
    from pathlib import Path

    from textual.widgets import DataTable, Select, Static

    from engine.report import paper
    from tests.engine.test_paper_report import record

    folder = tmp_path / "paper-small"
    for rate, records in {
        "0.1": [record("bw:85", 39, 3, (20, 10, 12)), record("bw:0", 40, 2, (4, 6, 8))],
        "0.01": [record("bw:0", 40, 9, (30, 20, 10))],
        "0.05": [record(f"bw:{i}", 40, 1, (1, 1, 1)) for i in (10, 2, 170)],
    }.items():
        (folder / f"rate-{rate}").mkdir(parents=True)
        for r in records:
            r["rate"] = float(rate)
            (folder / f"rate-{rate}" / f"{r['trigger'].replace(':', '-')}.json").write_text(
                json.dumps(r)
            )
    (folder / "rate.json").write_text(json.dumps({"rate": 0.1}))
    source = open_store_source(results=[folder])
    main, other = "paper-small · rate 0.1 (main)", "paper-small · rate 0.01"
    assert source.studies() == [other, "paper-small · rate 0.05", main]  # no store study here
    ordered = source.study_summary("paper-small · rate 0.05").triggers
    assert ordered == ("bw:2", "bw:10", "bw:170")  # by id, not as text
    expected = paper.summary(folder)["rates"]["0.1"]["methods"]
    app = make_store_app(source)
    async with app.run_test(size=(100, 30)) as pilot:
        await open_study_screen(pilot)
        app.screen.query_one("#study-name", Select).value = main
        await settle(pilot)
        grid = app.screen.summary
        assert grid is not None and grid.name == main and grid.triggers == ("bw:0", "bw:85")
        rows = summary_rows(app.screen)
        assert grid.methods == ("mesa", "point", "ideal", "finetune")
        for column, method in enumerate(grid.methods):
            assert_statistics(rows, column, expected[method])
            assert rows["clean acc"][column].plain.strip() == "60.0"  # 30 of 50 in every record
        grid_table = app.screen.query_one("#study-table", DataTable)
        assert grid_table.get_row("bw:85")[1].plain.strip() == "7.5"  # mesa: 3 of 40
        # the cell under the cursor in one line: its restarts' range and the paired difference
        grid_table.move_cursor(row=grid_table.get_row_index("bw:85"), column=2)
        await pilot.pause()
        versus = paper.summary(folder)["rates"]["0.1"]["per_trigger"]["bw:85"]["versus_reference"]
        lo, hi = (f"{100 * versus['point'][k]:.1f}" for k in ("lo", "hi"))
        detail = str(app.screen.query_one("#study-detail", Static).render())
        assert detail.startswith("bw:85 · point 35.0 % (3 restarts 25.0–50.0)")
        assert f"mesa minus point -27.5 points [{lo}, {hi}]" in detail
    report = Path(source.export_report("study", main))
    assert report.name == "report.md" and "2 of 51 triggers finished" in report.read_text()


def test_a_damaged_result_folder_is_listed_and_says_what_is_wrong_when_chosen(tmp_path):
    """A broken record does not hide the store's studies: its folder is listed as unreadable,
    and choosing it gives the report's one line naming the file."""
    from mesa_tui.source import SourceError

    (tmp_path / "paper-small" / "rate-0.1").mkdir(parents=True)
    (tmp_path / "paper-small" / "rate-0.1" / "bw-0.json").write_text("{not json")
    source = open_store_source(results=[tmp_path / "paper-small"])
    source.store.create_study("mine", "cpu-mini", {}, [])
    names = source.studies()
    assert names == ["mine", "paper-small · rate ? (unreadable)"]
    with pytest.raises(SourceError, match="bw-0.json is not valid JSON"):
        source.study_summary(names[1])
    with pytest.raises(SourceError, match="no longer in its result folder"):
        source.study_summary("paper-small · rate 0.5")


@pytest.mark.parametrize(
    ("damaged", "content"), [("rate-0.1/bw-0.json", "[1, 2]"), ("rate.json", '{"decided": 1}')]
)
async def test_a_result_folder_of_the_wrong_shape_keeps_the_store_s_studies(
    tmp_path, damaged, content
):
    """A record or rate decision of the wrong shape (valid JSON) is listed as unreadable beside
    the store's studies, and choosing it says in one line which file and what is wrong."""
    import json

    from textual.widgets import Select

    from tests.engine.test_paper_report import record

    folder = tmp_path / "paper-small"
    (folder / "rate-0.1").mkdir(parents=True)
    (folder / "rate-0.1" / "bw-0.json").write_text(json.dumps(record("bw:0", 40, 2, (4, 6, 8))))
    (folder / damaged).write_text(content)
    source = open_store_source(results=[folder])
    source.store.create_study("mine", "cpu-mini", {}, [])
    unreadable = "paper-small · rate ? (unreadable)"
    app = make_store_app(source)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_study_screen(pilot)
        select = screen.query_one("#study-name", Select)
        assert select.value == "mine"  # listed first, and chosen
        select.value = unreadable  # an option too (Select refuses a value it does not list)
        await settle(pilot)
        (notice,) = [n.message for n in app._notifications if str(folder) in n.message]
        assert notice.startswith(f"reading the study: {folder / damaged} is not a ")
        assert "\n" not in notice


def test_the_method_column_is_the_label_before_its_trigger_else_the_spec_method():
    from mesa_tui.source import label_method

    assert label_method("point #3 bw:85 -> 0", {"method": "point"}, "bw:85") == "point #3"
    assert label_method("mesa-0.9 square:white -> 0", {}, "square:white") == "mesa-0.9"
    assert label_method("attack bw:170 -> 0", {}, "bw:170") == "attack"
    assert label_method(None, {"method": "anp"}, None) == "anp"
    assert label_method("bw:7 -> 0", {"method": "finetune"}, "bw:7") == "finetune"
    assert (
        label_method("clean model", {}, None) == "clean model"
        and label_method(None, {}, None) is None
    )
    # Only the job's own trigger is looked for, as a word: no other trigger text is parsed.
    assert label_method("point bw:85 -> 0", {"method": "point"}, None) == "point"
    assert label_method("attack bw:170 -> 0", {}, "bw:1") == "attack bw:170 -> 0"


def test_store_source_annotates_and_finds_by_note_or_tag(store_source):
    (job_id,) = store_source.store.job_ids()
    row = store_source.annotate(job_id, "first clean run", ["baseline"])
    assert (row.note, row.tags) == ("first clean run", ("baseline",))
    assert store_source.annotate(job_id, "first clean run", ["paper"]).tags == ("paper",)
    found = store_source.jobs(JobQuery(text="CLEAN"), None)
    assert [r.id for r in found.rows] == [job_id] and found.ids == {job_id}
    assert store_source.jobs(JobQuery(text="baseline"), None).rows == ()  # removed above
    page = store_source.jobs(JobQuery(text="paper"), utc_now(), all_ids=True)
    assert page.ids == {job_id}


def test_store_source_gives_each_engine_its_host_and_slots(store_source):
    store = store_source.store
    engine = store.register_engine("box", 42, "t", 2, [{"index": 0, "name": "H100"}])
    system = {"cpus": 8, "cpu_pct": 12.0, "mem_used_mb": 2048.0, "mem_total_mb": 8192.0,
              "slots": [{"slot": 0, "gpu": "0", "job_id": 5, "cpu_pct": 99.0, "rss_mb": 700.0},
                        {"slot": 1, "gpu": "1", "job_id": None}]}  # fmt: skip
    store.engine_heartbeat(engine.id, 1, [{"index": 0, "name": "H100"}], system)
    (view,) = store_source.engine_status().engines
    assert (view.host, view.system.cpus, view.slots_used, view.slots) == ("box", 8, 1, 2)
    first, second = view.system.slots
    assert view.slot_gpu(first).name == "H100" and first.job_id == 5
    assert view.slot_gpu(second) is None and second.gpu == "1"  # no NVML figures for gpu 1


def test_store_source_gives_a_defense_its_lowest_asr_and_an_attack_its_highest(store_source):
    from store.repository import RunEvents

    store = store_source.store
    rows = {}
    for kind, values in (("defend", [0.9, 0.05, 0.2]), ("train", [0.5, 0.97, 0.9])):
        job_id, run_id = store.start_foreground(
            kind, {"kind": kind}, kind * 8, label=kind, host="h", pid=1, code_version="t"
        )
        events = RunEvents(run_id, job_id)
        events.metrics = [("eval/asr", step, v, time.time()) for step, v in enumerate(values)]
        store.record_events([events])
        rows[kind] = job_id
    page = {r.id: r for r in store_source.jobs(JobQuery(), None).rows}
    defend, train = page[rows["defend"]], page[rows["train"]]
    assert (defend.asr, defend.asr_best) == (pytest.approx(0.2), pytest.approx(0.05))
    assert (train.asr, train.asr_best) == (pytest.approx(0.9), pytest.approx(0.97))
    mesa = next(r for r in page.values() if r.kind == "mesa")
    assert mesa.asr is None and mesa.asr_best is None  # a search logs no ASR


def test_store_source_never_shows_an_earlier_runs_best_asr_for_a_retried_job():
    from types import SimpleNamespace

    store = SimpleNamespace(metric_range=lambda ids, key: {1: (0.1, 0.9)})
    source = StoreSource(store)
    first = SimpleNamespace(id=1, latest={"eval/asr": 0.2}, current_run_id=10, status="succeeded")
    assert source._asr_ranges([first]) == {1: (0.1, 0.9)}
    assert source._asr_ranges([first]) == {1: (0.1, 0.9)}  # from the cache
    again = SimpleNamespace(id=1, latest={}, current_run_id=11, status="running")  # no ASR yet
    assert source._asr_ranges([again]) == {}
