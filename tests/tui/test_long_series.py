"""Long series: the run screen reads a downsampled history once, then only new points, and every
plot holds a few points per pixel however long the run is."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from textual_plot import PlotWidget

from mesa_tui.demo import FakeSource
from mesa_tui.screens.run import RunScreen
from mesa_tui.source import HISTORY_POINTS
from mesa_tui.widgets.curves import CurvesPanel
from mesa_tui.widgets.series import MetricColumns, SeriesSet, downsample
from store.downsample import minmax
from store.entities import MetricHistory, MetricPoint, SeriesColumns

from .conftest import make_app, refresh_screen, settle


def test_widget_downsample_picks_the_points_the_store_picks():
    rng = np.random.default_rng(3)
    for trial in range(100):
        n = int(rng.integers(1, 3000))
        x = np.sort(rng.choice(np.arange(-10, 10 * n), size=n, replace=False)).astype(np.float64)
        y = rng.normal(size=n)
        y[rng.random(n) < 0.05] = np.nan
        y[rng.random(n) < 0.01] = np.inf
        y[rng.random(n) < 0.01] = -np.inf
        buckets = int(rng.integers(1, 200))
        xs, ys = downsample(x, y, buckets)
        ref_x, ref_y = minmax(x.tolist(), y.tolist(), buckets)
        assert xs.tolist() == ref_x, trial
        assert np.array_equal(ys, np.asarray(ref_y), equal_nan=True)
        assert len(xs) <= 2 * buckets or len(xs) == n


def test_series_set_loads_history_then_appends_and_stays_bounded():
    series = SeriesSet(max_points=50)
    columns = SeriesColumns([0, 10, 20], [3.0, 2.0, 1.0], count=900)
    history = MetricHistory(cursor=1000, run_ids=(1,), series={"train/loss": columns})
    assert series.load_history(history)
    assert series.series["train/loss"].n == 3 and series.cursor == 1000 and series.received == 900
    assert not series.load_history(
        MetricHistory(cursor=999, run_ids=(1,), series={})
    )  # older: kept
    points = [MetricPoint(1000 + i, 1, "train/loss", 20 + i, 1.0 / i, 0.0) for i in range(1, 1001)]
    points[500] = MetricPoint(1501, 1, "train/loss", 520, 99.0, 0.0)  # a spike survives compaction
    assert series.add_columns(MetricColumns(points)) == 1000
    loss = series.series["train/loss"]
    assert loss.n <= 2 * 50 and series.received == 1900 and series.cursor == 2000
    assert 99.0 in loss.values and loss.steps[0] == 0 and loss.steps[-1] == 1020
    assert np.all(np.diff(loss.steps) > 0)


def long_run(points: int) -> tuple[FakeSource, int]:
    source = FakeSource()
    job = source.add_job("train", "running", spec={"kind": "train", "trigger": "bw:1"})
    run = source.run_ids(job)[0]
    steps = np.arange(points // 2, dtype=np.int64)
    loss = 1 / (1 + steps / 1000)
    loss[77_777] = 5.0  # one spike in the middle of the history
    source.bulk_metrics(run, "train/loss", steps, loss)
    source.bulk_metrics(run, "train/acc", steps, 1 - loss)
    return source, job


async def test_a_run_with_many_points_opens_and_shows_a_plot(clock):
    source, job = long_run(300_000)
    app = make_app(source, clock)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        started = time.perf_counter()
        app.open_job(job)
        await refresh_screen(pilot)
        opened_s = time.perf_counter() - started
        run = app.screen
        assert isinstance(run, RunScreen)
        assert run.series.received == 300_000
        loss = run.series.series["train/loss"]
        assert loss.n <= 2 * HISTORY_POINTS and loss.steps[-1] == 149_999
        assert 5.0 in loss.values  # the spike is kept
        run.redraw()
        await settle(pilot, 1)
        plot = run.query_one(CurvesPanel).panels()["loss"].query_one(PlotWidget)
        assert plot._datasets, "the loss plot draws nothing"
        drawn = plot._datasets[0]
        width = plot.size.width
        assert 0 < len(drawn.x) <= 2 * width  # downsampled to the pixels it has
        assert max(drawn.y) == pytest.approx(5.0)
        # New points are read incrementally (above the history's cursor) and appended.
        source.log_metrics(source.run_ids(job)[0], 150_000, {"train/loss": 0.25})
        await refresh_screen(pilot)
        assert run.series.received == 300_001
        assert run.series.series["train/loss"].last() == 0.25
        assert opened_s < 30  # generous: a shared machine; the benchmark measures it


def test_store_source_history_and_loss_tails(tmp_path):
    from mesa_tui.source import JobQuery, open_store_source
    from store.repository import RunEvents

    source = open_store_source()
    store = source.store
    job, run = store.start_foreground(
        "train", {"kind": "train", "trigger": "bw:1"}, "0" * 64, label="bw:1", host="h", pid=1,
        code_version="t",
    )  # fmt: skip
    for first in range(0, 20_000, 5000):
        events = RunEvents(run, job)
        events.metrics = [
            ("train/loss", s, 1 / (1 + s), time.time()) for s in range(first, first + 5000)
        ]
        store.record_events([events])
    history = source.metric_history(job, 100)
    assert history.count == 20_000 and len(history.series["train/loss"].steps) <= 200
    assert history.cursor == store.metrics_since([run], limit=10**6)[-1].id
    page = source.jobs(JobQuery(), None)
    [row] = page.rows
    assert row.loss_tail == tuple(1 / (1 + s) for s in range(20_000 - 24, 20_000))
    events = RunEvents(run, job)
    events.metrics = [("train/loss", 20_000, math.inf, time.time())]
    store.record_events([events])
    later = source.jobs(JobQuery(), page.cursor, all_ids=True)
    [row] = later.rows  # running: its tail is read again
    assert row.loss_tail[-1] == math.inf and len(row.loss_tail) == 24
    assert later.ids == frozenset({job})  # every matching job's id, read without its row
