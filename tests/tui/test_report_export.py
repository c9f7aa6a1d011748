"""The export key (`x`) on the study and run screens: a report under the data home, in a worker,
with the path in a notice; over the FakeSource and over the real store."""

from __future__ import annotations

from pathlib import Path

from engine import paths
from mesa_tui.screens.run import RunScreen
from mesa_tui.source import open_store_source, utc_now

from .conftest import SLOW, make_app, open_study_screen, settle, wait_until


def written(app) -> list[Path]:
    prefix = "report written to "
    return [
        Path(n.message[len(prefix) :]) for n in app._notifications if n.message.startswith(prefix)
    ]


async def test_study_screen_exports_the_chosen_study(demo, clock):
    app = make_app(demo, clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await open_study_screen(pilot)
        await pilot.press("x")
        await settle(pilot)
        assert ("export_report", ("study", "mini")) in demo.calls
        (path,) = written(app)
        assert path.is_file() and path.parent.parent == paths.data_home() / "reports"
        assert path.parent.name.startswith("mini-")


async def test_run_screen_exports_its_job(demo, clock):
    app = make_app(demo, clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        app.open_job(2)
        await settle(pilot)
        assert isinstance(app.screen, RunScreen)
        await pilot.press("x")
        await settle(pilot)
        assert ("export_report", ("job", 2)) in demo.calls
        (path,) = written(app)
        assert path.is_file() and path.parent.name.startswith("job-2-")
        assert isinstance(app.screen, RunScreen)


async def test_export_over_the_store_writes_the_real_report(tmp_path):
    from tests.engine.report_study import make_study

    store = make_study(tmp_path / "artifacts")
    job = next(m.job_id for m in store.study_members("mini") if m.kind == "mesa")
    store.close()
    source = open_store_source()
    from mesa_tui.app import create_app

    app = create_app(source, utc_now, poll_s=SLOW, metrics_poll_s=SLOW, redraw_s=SLOW)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        app.open_job(job)
        await settle(pilot)
        await pilot.press("x")
        await wait_until(pilot, lambda: written(app), timeout=60)
        (path,) = written(app)
        report = path.read_text()
        assert f"# Report: job {job} (mesa" in report and "## MESA searches" in report
        assert (path.parent / "figures" / f"search-{job}-grids.png").is_file()
    source.store.close()
