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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--polls", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=10_000, help="queued jobs besides the 24")
    args = parser.parse_args()
    home = isolated_home("poll")
    from store.entities import NewJob
    from store.repository import RunEvents, Store

    store = Store()
    engine_id = store.register_engine("bench", 0, "bench", 24).id
    store.submit([NewJob("count", {"seed": i}, f"h{i}", label=f"job {i}") for i in range(24)])
    claimed = store.claim_jobs(
        engine_id, 24, host="bench", executor="local", code_version="bench",
        workdir_for=lambda k, i: str(home / f"{k}-{i}"), startup_grace_s=3600,
    )  # fmt: skip
    keys = [f"train/k{k}" for k in range(10)]
    per_run = args.points // len(claimed)
    steps = per_run // len(keys)
    build_start = time.perf_counter()
    for c in claimed:
        for first in range(0, steps, 5000):
            events = RunEvents(c.run_id, c.job_id)
            now = time.time()
            events.metrics = [
                (k, s, float(s), now) for s in range(first, min(first + 5000, steps)) for k in keys
            ]
            store.record_events([events])
    for c in claimed[:20]:
        store.finish_run(c.run_id, "succeeded", result={"metrics": {}})
    for first in range(0, args.jobs, 2000):
        store.submit(
            [
                NewJob("train", {"seed": i, "trigger": f"bw:{i}"}, f"q{i}", label=f"queued {i}")
                for i in range(first, min(first + 2000, args.jobs))
            ]
        )
    build_s = time.perf_counter() - build_start
    live = claimed[20:]
    live_runs = [c.run_id for c in live]

    cursor_time = max(j.updated_at for j in store.list_jobs())
    cursor_id = store.metrics_since(live_runs, limit=1_000_000)[-1].id
    next_step = {c.run_id: steps for c in live}
    ours, naive = [], []
    for _ in range(args.polls):
        # 50 points per second per run, polled twice a second: 25 new points per run per poll.
        batch = []
        for c in live:
            events = RunEvents(c.run_id, c.job_id)
            now = time.time()
            events.metrics = [
                (keys[i % 10], next_step[c.run_id] + i // 10, 1.0, now) for i in range(25)
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
    ours.sort()

    def median_ms(fn, times: int) -> float:
        spent = []
        for _ in range(times):
            started = time.perf_counter()
            fn()
            spent.append((time.perf_counter() - started) * 1000)
        return round(statistics.median(spent), 2)

    all_jobs = [c.job_id for c in claimed]
    ids_ms = median_ms(store.job_ids, 20)
    summaries_ms = median_ms(store.list_jobs, 3)
    tail_ms = median_ms(lambda: store.metric_tail(all_jobs, keys[0], 24), 20)
    tail_reference_ms = median_ms(
        lambda: [store.metrics_since([c.run_id], 0, 100_000, keys=[keys[0]]) for c in claimed], 3
    )
    assert len(store.metric_tail(all_jobs, keys[0], 24)[all_jobs[0]]) == 24
    print(
        json.dumps(
            {
                "benchmark": "TUI poll: jobs changed since T + new metrics of 4 runs",
                "machine": machine(),
                "stored_points": len(claimed) * steps * len(keys),
                "build_s": round(build_s, 1),
                "poll_ms_median": round(statistics.median(ours), 2),
                "poll_ms_p95": round(ours[int(0.95 * len(ours))], 2),
                "naive_poll_ms_median_reference": round(statistics.median(naive), 1),
                "target_ms": 5,
                "meets_target": statistics.median(ours) <= 5,
                "jobs": len(all_jobs) + args.jobs,
                "deleted_jobs_check_ids_only_ms_median": ids_ms,
                "deleted_jobs_check_all_summaries_ms_median_reference": summaries_ms,
                "loss_sparklines_metric_tail_24_jobs_ms_median": tail_ms,
                "loss_sparklines_every_loss_point_ms_median_reference": tail_reference_ms,
                "loadavg": open("/proc/loadavg").read().split()[:3],
            }
        )
    )


if __name__ == "__main__":
    main()
