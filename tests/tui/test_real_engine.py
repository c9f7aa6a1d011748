"""A real engine process runs a tiny search-like job; the app over the store sees its curves and
its trigger grid fill in while it runs."""

from __future__ import annotations

import pytest

from mesa_tui.app import create_app
from mesa_tui.screens.run import RunScreen
from mesa_tui.source import StoreSource, utc_now
from mesa_tui.widgets.curves import CurvesPanel
from mesa_tui.widgets.trigger_grid import TriggerGrid

from .conftest import wait_until

pytestmark = pytest.mark.slow


async def test_real_engine_fills_curves_and_trigger_grid(tmp_path):
    from store.entities import NewJob
    from store.repository import Store
    from tests.engine.helpers import start_engine, stop_engine

    store = Store()
    spec = {"steps": 60, "step_s": 0.1, "betas": [0.9, 0.5]}
    (job,) = store.submit([NewJob("searchlike", spec, "searchlike-test", label="bw:170")])
    engine = start_engine(tmp_path, MESA_TUI_TASK_MODULES="searchlike=tests.tui.search_like_task")
    try:
        app = create_app(StoreSource(store), utc_now, poll_s=0.2, metrics_poll_s=0.2, redraw_s=0.2)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(pilot, lambda: store.job(job).status == "running", timeout=60)
            app.open_job(job)
            await pilot.pause(0.2)
            run = app.screen
            assert isinstance(run, RunScreen)
            hinge = "mesa/beta=0.9/hinge"
            await wait_until(pilot, lambda: hinge in run.series.series, timeout=60)
            first = run.series.series[hinge].n
            await wait_until(pilot, lambda: run.series.series[hinge].n > first, timeout=60)
            panel = run.query_one(CurvesPanel)
            await wait_until(
                pilot,
                lambda: hinge in panel.selected() and panel.drawn_versions().get(job, 0) > 1,
                timeout=30,
            )
            grid = run.query_one(TriggerGrid)
            await wait_until(pilot, lambda: set(grid.by_beta) == {"0.9", "0.5"}, timeout=60)
            assert grid.original is not None and grid.by_beta["0.9"].shape == (32, 3, 3, 3)
            await wait_until(pilot, lambda: store.job(job).status == "succeeded", timeout=90)
            await wait_until(pilot, lambda: run.series.series[hinge].n == 60, timeout=30)
    finally:
        stop_engine(engine)
        store.close()
