"""The TUI's poll at 1 million stored metric points and 10,000 jobs: jobs changed since T plus
the new metric points of 4 running runs (id cursor), as ``mesa_tui`` polls every half second.

Builds a store with 1,000,000 points (20 finished runs of history and 4 running runs) and
``--jobs`` queued jobs besides, then times the poll while the 4 runs receive 50 points per second
each. Reference in the same run: the naive poll (every job, and every point of the 4 runs read
again). Target: <= 5 ms. Also timed, each with its reference: the jobs table's periodic check for
deleted jobs (ids only; reference: every job's summary, as it read before), and the loss
sparklines of the 24 jobs with points (``metric_tail``, one read; reference: every loss point of
each job's run, as it read at a job's first sight before).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from _engine_bench import isolated_home, machine

KEYS = [f"train/k{k}" for k in range(10)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--polls", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=10_000, help="queued jobs besides the 24")
    args = parser.parse_args()
    home = isolated_home("poll")
    from store.repository import Store

    store = Store()
    build_start = time.perf_counter()
    claimed, steps = _build(store, home, args.points, args.jobs)
    build_s = time.perf_counter() - build_start
    ours, naive = _polls(store, claimed[20:], steps, args.polls)
    print(
        json.dumps(
            {
                "benchmark": "TUI poll: jobs changed since T + new metrics of 4 runs",
                "machine": machine(),
                "stored_points": len(claimed) * steps * len(KEYS),
                "build_s": round(build_s, 1),
                "poll_ms_median": round(statistics.median(ours), 2),
                "poll_ms_p95": round(ours[int(0.95 * len(ours))], 2),
                "naive_poll_ms_median_reference": round(statistics.median(naive), 1),
                "target_ms": 5,
                "meets_target": statistics.median(ours) <= 5,
                "jobs": len(claimed) + args.jobs,
                **_app_queries(store, [c.job_id for c in claimed], [c.run_id for c in claimed]),
                "loadavg": open("/proc/loadavg").read().split()[:3],
            }
        )
    )


def _build(store, home, points: int, queued: int):
    """24 claimed jobs sharing ``points`` metric points (20 of them finished), and ``queued``
    more jobs waiting: (the claims, steps per key and run)."""
    from store.entities import NewJob
    from store.repository import RunEvents

    engine_id = store.register_engine("bench", 0, "bench", 24).id
    store.submit([NewJob("count", {"seed": i}, f"h{i}", label=f"job {i}") for i in range(24)])
    claimed = store.claim_jobs(
        engine_id, 24, host="bench", executor="local", code_version="bench",
        workdir_for=lambda k, i: str(home / f"{k}-{i}"), startup_grace_s=3600,
    )  # fmt: skip
    steps = points // len(claimed) // len(KEYS)
    for c in claimed:
        for first in range(0, steps, 5000):
            events = RunEvents(c.run_id, c.job_id)
            now = time.time()
            events.metrics = [
                (k, s, float(s), now) for s in range(first, min(first + 5000, steps)) for k in KEYS
            ]
            store.record_events([events])
    for c in claimed[:20]:
        store.finish_run(c.run_id, "succeeded", result={"metrics": {}})
    for first in range(0, queued, 2000):
        store.submit(
            [
                NewJob("train", {"seed": i, "trigger": f"bw:{i}"}, f"q{i}", label=f"queued {i}")
                for i in range(first, min(first + 2000, queued))
            ]
        )
    return claimed, steps


def _polls(store, live, steps: int, polls: int) -> tuple[list[float], list[float]]:
    """The app's poll while the live runs stream (ms, sorted), and the naive re-read beside
    the first ten (ms)."""
    from store.repository import RunEvents

    live_runs = [c.run_id for c in live]
    cursor_time = max(j.updated_at for j in store.list_jobs())
    cursor_id = store.metrics_since(live_runs, limit=1_000_000)[-1].id
    next_step = {c.run_id: steps for c in live}
    ours, naive = [], []
    for _ in range(polls):
        # 50 points per second per run, polled twice a second: 25 new points per run per poll.
        batch = []
        for c in live:
            events = RunEvents(c.run_id, c.job_id)
            now = time.time()
            events.metrics = [
                (KEYS[i % 10], next_step[c.run_id] + i // 10, 1.0, now) for i in range(25)
            ]
            events.progress = {"stage": "train", "done": next_step[c.run_id], "total": 10**9}
            next_step[c.run_id] += 3
            batch.append(events)
        store.record_events(batch)
        started = time.perf_counter()
        changed, points = store.poll(cursor_time, live_runs, cursor_id)
        ours.append((time.perf_counter() - started) * 1000)
        assert len(changed) == 4 and len(points) == 100, (len(changed), len(points))
        cursor_time = max(j.updated_at for j in changed)
        cursor_id = points[-1].id
        if len(naive) < 10:
            started = time.perf_counter()
            store.list_jobs()
            store.metrics_since(live_runs, after_id=0, limit=10_000_000)
            naive.append((time.perf_counter() - started) * 1000)
    return sorted(ours), naive


def _median_ms(fn, times: int) -> float:
    spent = []
    for _ in range(times):
        started = time.perf_counter()
        fn()
        spent.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(spent), 2)


def _app_queries(store, all_jobs: list[int], runs: list[int]) -> dict[str, float]:
    """The app's other reads (ms, median), each beside the reference it replaces."""
    tail = store.metric_tail(all_jobs, KEYS[0], 24)
    assert len(tail[all_jobs[0]]) == 24
    return {
        "deleted_jobs_check_ids_only_ms_median": _median_ms(store.job_ids, 20),
        "deleted_jobs_check_all_summaries_ms_median_reference": _median_ms(store.list_jobs, 3),
        "loss_sparklines_metric_tail_24_jobs_ms_median": _median_ms(
            lambda: store.metric_tail(all_jobs, KEYS[0], 24), 20
        ),
        "loss_sparklines_every_loss_point_ms_median_reference": _median_ms(
            lambda: [store.metrics_since([r], 0, 100_000, keys=[KEYS[0]]) for r in runs], 3
        ),
    }


if __name__ == "__main__":
    main()
