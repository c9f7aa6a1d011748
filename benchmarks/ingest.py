"""Metric ingest through the engine path: a child logs points -> JSON lines on a pipe -> the
engine parses and writes them in batches (metrics + latest_metrics, one transaction per flush).

Measured: points per second from the child's first point to the end of the run (recorded after
the last batch is written), with a real engine and a real child (the test task "count" logging KEYS keys per step, no sleep). Reference in the same
run: ``Store.record_events`` alone (the store's share of the cost). Target: >= 50,000 points/s.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

from _engine_bench import isolated_home, machine, start_engine, stop_engine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--keys", type=int, default=50)
    args = parser.parse_args()
    home = isolated_home("ingest")
    from sqlalchemy import func, select

    from store.entities import NewJob
    from store.models import Metric
    from store.repository import RunEvents, Store

    store = Store()
    total = args.steps * args.keys

    # Reference: the store alone, batches the size the engine writes.
    engine_id = store.register_engine("bench", 0, "bench", 1).id
    store.submit([NewJob("count", {"steps": 1}, "ref")])
    claimed = store.claim_jobs(
        engine_id, 1, host="bench", executor="local", code_version="bench",
        workdir_for=lambda k, i: str(home / f"{k}-{i}"), startup_grace_s=60,
    )[0]  # fmt: skip
    started = time.perf_counter()
    batch_steps = 200
    for first in range(0, args.steps, batch_steps):
        events = RunEvents(claimed.run_id, claimed.job_id)
        now = time.time()
        events.metrics = [
            (f"bench/k{k}", s, float(s), now)
            for s in range(first, min(first + batch_steps, args.steps))
            for k in range(args.keys)
        ]
        store.record_events([events])
    store_only = total / (time.perf_counter() - started)
    store.finish_run(claimed.run_id, "succeeded", result={"metrics": {}})

    engine = start_engine()
    try:
        (job,) = store.submit(
            [
                NewJob(
                    "count",
                    {
                        "steps": args.steps,
                        "step_s": 0.0,
                        "keys": args.keys,
                        "checkpoint_every": 1000000,
                    },
                    "ingest",
                )
            ]
        )
        while store.job(job).status not in ("succeeded", "failed", "lost", "cancelled"):
            time.sleep(0.25)
        if store.job(job).status != "succeeded":
            raise SystemExit(
                f"the ingest job ended {store.job(job).status}: {store.job(job).error}"
            )
        run = store.runs(job)[0]
        run_id = run.id
        first_point = store.metrics_since([run_id], limit=1)[0].wall_time
        # From the child's first point to the run's end, which comes after the last write.
        through_engine = total / (run.ended_at.timestamp() - first_point)
    finally:
        stop_engine(engine)
    with store.engine.connect() as conn:
        duplicates = (
            conn.execute(
                select(func.count()).select_from(Metric).where(Metric.run_id == run_id)
            ).scalar_one()
            - total
        )
    print(
        json.dumps(
            {
                "benchmark": "metric ingest through the engine path",
                "machine": machine(),
                "points": total,
                "points_per_s_engine_path": round(through_engine),
                "points_per_s_store_only_reference": round(store_only),
                "target_points_per_s": 50000,
                "meets_target": through_engine >= 50000,
                "extra_rows": duplicates,
            }
        )
    )


if __name__ == "__main__":
    main()
