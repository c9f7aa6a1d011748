"""Queue latency: from ``submit`` to the child's first event, with an engine already running.

The first event (``started``) is sent by the child before it imports the task, so this is the
engine's share: noticing the job, claiming it, writing the run row, launching the process and
Python's own start-up. The task's imports (pydantic specs, torch for real tasks) are reported
separately, from the child's ``env`` event. Reference in the same run: a bare ``python -c pass``.
Target: <= 1 s. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from _engine_bench import isolated_home, machine, start_engine, stop_engine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    isolated_home("latency")
    from store.entities import NewJob
    from store.repository import Store

    store = Store()
    engine = start_engine()
    latencies, python_starts, imports = [], [], []
    try:
        for i in range(args.repeats):
            submitted = time.time()
            (job,) = store.submit(
                [NewJob("count", {"steps": 1, "step_s": 0.0, "seed": i}, f"q{i}")]
            )
            while store.job(job).status not in ("succeeded", "failed", "lost", "cancelled"):
                time.sleep(0.05)
            first = next(e for e in store.logs(job_id=job) if e.message.endswith(" started"))
            latencies.append(first.wall_time - submitted)
            env = store.runs(job)[0].env
            imports.append(env.get("imports_s"))
            python_starts.append(env.get("startup_s", 0) - env.get("imports_s", 0))
    finally:
        stop_engine(engine)
    bare = []
    for _ in range(5):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        bare.append(time.perf_counter() - started)
    median = statistics.median(latencies)
    print(
        json.dumps(
            {
                "benchmark": "queue latency: submit -> child's first event",
                "machine": machine(),
                "repeats": args.repeats,
                "latency_s_median": round(median, 3),
                "latency_s_max": round(max(latencies), 3),
                "child_python_start_s_median": round(statistics.median(python_starts), 3),
                "task_imports_s_median": round(statistics.median(imports), 3),
                "bare_python_start_s_reference": round(statistics.median(bare), 3),
                "target_s": 1.0,
                "meets_target": median <= 1.0,
            }
        )
    )


if __name__ == "__main__":
    main()
