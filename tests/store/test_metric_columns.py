"""Downsampled series and loss tails: ``store.downsample`` exactly, and the store's SQL against it."""

from __future__ import annotations

import math
import random
import time

import pytest

from store import downsample
from store.entities import NewJob
from store.repository import RunEvents, Store


@pytest.fixture
def store(store_url):
    s = Store(store_url)
    yield s
    s.close()


def reference(steps, values, max_points):
    """Brute force: first, last, and per bucket the earliest minimum and maximum (NaN never)."""
    n = len(steps)
    if n <= 2 * max_points:
        return list(steps), list(values)
    lo, hi = steps[0], steps[-1]
    buckets = max_points - 1
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(steps):
        groups.setdefault(min(buckets - 1, (s - lo) * buckets // (hi - lo + 1)), []).append(i)
    keep = {0, n - 1}
    for members in groups.values():
        finite = [i for i in members if not math.isnan(values[i])]
        if finite:
            keep.add(min(finite, key=lambda i: (values[i], i)))
            keep.add(min(finite, key=lambda i: (-values[i], i)))
    idx = sorted(keep)
    return [steps[i] for i in idx], [values[i] for i in idx]


def test_minmax_keeps_first_last_and_each_buckets_min_and_max():
    steps = list(range(40))
    values = [float(s % 7) for s in steps]
    values[13] = 100.0  # a spike
    values[26] = -50.0  # a dip
    out_steps, out_values = downsample.minmax(steps, values, 5)
    assert (out_steps, out_values) == reference(steps, values, 5)
    assert out_steps[0] == 0 and out_steps[-1] == 39
    assert 100.0 in out_values and -50.0 in out_values
    assert len(out_steps) <= 10
    # 4 buckets of 10 steps: bucket 0 holds steps 0..9; its minimum 0 at step 0 and its earliest
    # maximum 6 at step 6.
    assert out_steps[:2] == [0, 6]
    assert out_steps == sorted(out_steps)


def test_minmax_short_series_comes_back_whole():
    steps, values = [1, 5, 9], [0.5, float("nan"), math.inf]
    assert downsample.minmax(steps, values, 2) == (steps, values)
    assert downsample.minmax(list(range(10)), [0.0] * 10, 5) == (list(range(10)), [0.0] * 10)


def test_minmax_nan_never_chosen_inf_is_a_value_and_bound_holds():
    rng = random.Random(1)
    for trial in range(200):
        n = rng.randint(1, 400)
        start = rng.randint(-5, 50)
        steps = sorted(rng.sample(range(start, start + 3 * n), n))
        values = [
            rng.choice([math.nan, math.inf, -math.inf, rng.uniform(-1, 1), rng.uniform(-1, 1)])
            for _ in steps
        ]
        max_points = rng.randint(1, 40)
        out_steps, out_values = downsample.minmax(steps, values, max_points)
        assert len(out_steps) <= 2 * max_points or (n <= 2 * max_points and out_steps == steps)
        assert out_steps == sorted(set(out_steps))
        assert out_steps[0] == steps[0] and out_steps[-1] == steps[-1]
        if max_points > 1:
            ref = reference(steps, values, max_points)
            assert out_steps == ref[0], trial
            assert [repr(v) for v in out_values] == [repr(v) for v in ref[1]]
        if n > 2 * max_points:  # downsampled: NaN only where it is the first or the last point
            ends = (steps[0], steps[-1])
            inner = [v for s, v in zip(out_steps, out_values, strict=True) if s not in ends]
            assert not any(math.isnan(v) for v in inner)


def log_series(store, run, job, key, steps, values):
    for first in range(0, len(steps), 5000):
        events = RunEvents(run, job)
        events.metrics = [
            (key, s, v, time.time())
            for s, v in zip(steps[first : first + 5000], values[first : first + 5000], strict=True)
        ]
        store.record_events([events])


def foreground(store, label="x"):
    return store.start_foreground(
        "train", {"kind": "train"}, "0" * 64, label=label, host="h", pid=1, code_version="t"
    )


def test_series_columns_reduce_in_sql_exactly_as_in_python(store):
    job, run = foreground(store)
    rng = random.Random(0)
    steps = list(range(3, 6003, 2))
    values = [1 / (1 + s / 500) + (rng.random() * 5 if rng.random() < 0.01 else 0) for s in steps]
    values[1000] = math.inf  # SQLite stores infinities (NaN it cannot: the column is NOT NULL)
    log_series(store, run, job, "train/loss", steps, values)
    log_series(store, run, job, "eval/acc", list(range(10)), [0.1 * i for i in range(10)])

    history = store.metric_series_columns(job, max_points=50)
    assert history.run_ids == (run,)
    assert history.cursor == store.metrics_since([run], limit=10**6)[-1].id
    loss = history.series["train/loss"]
    assert (loss.steps, loss.values) == reference(steps, values, 50)
    assert loss.count == len(steps) and len(loss.steps) <= 100
    assert math.inf in loss.values and max(values[:1000]) in loss.values
    acc = history.series["eval/acc"]  # short: every point, as stored
    assert acc.steps == list(range(10)) and acc.count == 10
    only = store.metric_series_columns(job, keys=["eval/acc", "nope"], max_points=50)
    assert list(only.series) == ["eval/acc"]


def test_series_columns_join_attempts_at_resume_like_metric_series(store):
    engine = store.register_engine("here", 1, "test", 1)
    (job,) = store.submit([NewJob("train", {"seed": 3}, "a", max_attempts=2)])

    def claim():
        return store.claim_jobs(
            engine.id, 1, host="here", executor="local", code_version="t",
            workdir_for=lambda k, i: f"/tmp/{k}-{i}", startup_grace_s=60,
        )[0].run_id  # fmt: skip

    run1 = claim()
    log_series(store, run1, job, "train/loss", list(range(0, 900)), [float(s) for s in range(900)])
    store.mark_lost([run1], "missed its check-in")
    run2 = claim()
    # The second attempt resumed from a checkpoint at step 600, with other values.
    log_series(store, run2, job, "train/loss", list(range(600, 1500)), [-1.0] * 900)
    joined = store.metric_series(job, "train/loss")
    history = store.metric_series_columns(job, max_points=20)
    series = history.series["train/loss"]
    assert series.count == len(joined) == 1500
    assert (series.steps, series.values) == reference(
        [p.step for p in joined], [p.value for p in joined], 20
    )
    whole = store.metric_series_columns(job, max_points=1000).series["train/loss"]
    assert whole.steps == [p.step for p in joined] and whole.values == [p.value for p in joined]
    assert history.run_ids == (run1, run2)


def test_metric_tail_reads_the_last_points_of_each_jobs_newest_run_in_order(store):
    a, run_a = foreground(store, "a")
    b, run_b = foreground(store, "b")
    c, _ = foreground(store, "c")  # no points at all
    log_series(store, run_a, a, "train/loss", list(range(100)), [float(s) for s in range(100)])
    log_series(store, run_b, b, "train/loss", [5, 7], [0.5, 0.7])
    log_series(store, run_b, b, "eval/acc", list(range(50)), [1.0] * 50)
    statements = []

    from sqlalchemy import event

    def count(*args):
        statements.append(args[2])

    event.listen(store.engine, "before_cursor_execute", count)
    try:
        tails = store.metric_tail([a, b, c], "train/loss", 5)
    finally:
        event.remove(store.engine, "before_cursor_execute", count)
    assert tails == {a: [95.0, 96.0, 97.0, 98.0, 99.0], b: [0.5, 0.7]}
    assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) == 1
    assert store.metric_tail([a], "eval/acc", 3) == {}
    assert store.metric_tail([], "train/loss", 3) == {}


def test_metric_range_is_the_least_and_greatest_value_of_each_jobs_newest_run(store):
    a, run_a = foreground(store, "a")
    b, run_b = foreground(store, "b")
    c, _ = foreground(store, "c")  # no points at all
    log_series(store, run_a, a, "eval/asr", [0, 1, 2, 3], [0.9, 0.05, 0.2, 0.1])
    log_series(store, run_b, b, "eval/asr", [0], [math.inf])
    log_series(store, run_b, b, "train/loss", [0, 1], [7.0, -3.0])
    assert store.metric_range([a, b, c], "eval/asr") == {a: (0.05, 0.9), b: (math.inf, math.inf)}
    assert store.metric_range([a], "train/loss") == {}
    assert store.metric_range([], "eval/asr") == {}


def test_job_ids_are_the_ids_list_jobs_returns(store):
    a, b, c = (store.submit([NewJob("train", {"seed": i}, f"h{i}")])[0] for i in range(3))
    cursor = store.job(a).updated_at
    store.request_cancel(b)
    assert store.job_ids() == [j.id for j in store.list_jobs()] == [a, b, c]
    assert store.job_ids(status="cancelled") == [b]
    assert store.job_ids(kind="mesa") == []
    assert store.job_ids(changed_since=cursor) == [
        j.id for j in store.list_jobs(changed_since=cursor)
    ]
