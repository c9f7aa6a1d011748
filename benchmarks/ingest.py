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
    from store.repository import Store

    store = Store()
    total = args.steps * args.keys
    store_only = total / _store_only_s(store, home, args.steps, args.keys)
    run_id, seconds = _through_engine(store, args.steps, args.keys)
    through_engine = total / seconds
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
                "extra_rows": _stored_points(store, run_id) - total,
            }
        )
    )


def _store_only_s(store, home, steps: int, keys: int) -> float:
    """Reference: the store alone, in batches the size the engine writes (seconds)."""
    from store.entities import NewJob
    from store.repository import RunEvents

    engine_id = store.register_engine("bench", 0, "bench", 1).id
    store.submit([NewJob("count", {"steps": 1}, "ref")])
    claimed = store.claim_jobs(
        engine_id, 1, host="bench", executor="local", code_version="bench",
        workdir_for=lambda k, i: str(home / f"{k}-{i}"), startup_grace_s=60,
    )[0]  # fmt: skip
    started = time.perf_counter()
    batch_steps = 200
    for first in range(0, steps, batch_steps):
        events = RunEvents(claimed.run_id, claimed.job_id)
        now = time.time()
        events.metrics = [
            (f"bench/k{k}", s, float(s), now)
            for s in range(first, min(first + batch_steps, steps))
            for k in range(keys)
        ]
        store.record_events([events])
    seconds = time.perf_counter() - started
    store.finish_run(claimed.run_id, "succeeded", result={"metrics": {}})
    return seconds


def _through_engine(store, steps: int, keys: int) -> tuple[int, float]:
    """A counting job through a real engine: (its run, seconds from the child's first point to
    the run's end, which comes after the last write)."""
    from store.entities import NewJob

    engine = start_engine()
    try:
        spec = {"steps": steps, "step_s": 0.0, "keys": keys, "checkpoint_every": 1000000}
        (job,) = store.submit([NewJob("count", spec, "ingest")])
        while store.job(job).status not in ("succeeded", "failed", "lost", "cancelled"):
            time.sleep(0.25)
        if store.job(job).status != "succeeded":
            raise SystemExit(
                f"the ingest job ended {store.job(job).status}: {store.job(job).error}"
            )
        run = store.runs(job)[0]
        first_point = store.metrics_since([run.id], limit=1)[0].wall_time
        return run.id, run.ended_at.timestamp() - first_point
    finally:
        stop_engine(engine)


def _stored_points(store, run_id: int) -> int:
    from sqlalchemy import func, select

    from store.models import Metric

    with store.engine.connect() as conn:
        query = select(func.count()).select_from(Metric).where(Metric.run_id == run_id)
        return conn.execute(query).scalar_one()


if __name__ == "__main__":
    main()
