"""The engine with real processes: kill -9 and resume, many submitters and engines on one
SQLite file, cancel within 10 s, missed check-ins."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from store.entities import NewJob
from store.repository import Store
from tests.engine.helpers import (
    FINISHED,
    ROOT,
    engine_env,
    pid_alive,
    start_engine,
    stop_engine,
    wait_for,
)


def count_job(**spec) -> NewJob:
    return NewJob("count", spec, f"count-{sorted(spec.items())}", label="count")


@pytest.fixture
def store():
    s = Store()
    yield s
    s.close()


def test_kill_9_engine_then_restart_resumes_from_checkpoint(tmp_path, store_url, store):
    (job,) = store.submit([count_job(steps=40, step_s=0.08, checkpoint_every=5)])
    first = start_engine(tmp_path, "first")
    try:
        wait_for(lambda: store.job(job).latest.get("count/k0", -1) >= 12, what="12 steps recorded")
        child = int(store.runs(job)[0].external_id)
        first.send_signal(signal.SIGKILL)
        first.wait()
        before = {(p.step, p.value) for p in store.metrics_since([store.runs(job)[0].id])}
        wait_for(lambda: not pid_alive(child), timeout=15, what="the orphaned child to stop")
        second = start_engine(tmp_path, "second")
        try:
            wait_for(lambda: store.job(job).status in FINISHED, timeout=30, what="the retry")
        finally:
            stop_engine(second)
    finally:
        stop_engine(first)
    detail = store.job_detail(job)
    assert detail.job.status == "succeeded", detail.job.error
    assert [r.status for r in detail.runs] == ["lost", "succeeded"]
    resumed = detail.runs[1]
    assert resumed.resumed and resumed.start_step is not None
    assert resumed.start_step % 5 == 0 and resumed.start_step > 0
    # Every step exactly once, even those the dead engine received but never stored: the retry
    # replayed the journal before computing the steps after its checkpoint again.
    series = store.metric_series(job, "count/k0")
    assert [(p.step, p.value) for p in series] == [(s, float(s)) for s in range(40)]
    assert {p.attempt for p in series} == {2}
    assert before <= {(p.step, p.value) for p in series}
    rows = store.metrics_since([r.id for r in detail.runs])
    assert len(rows) == len({(p.run_id, p.key, p.step) for p in rows})


SUBMITTER = """
import sys
from store.entities import NewJob
from store.repository import Store
store = Store()
for i in range(int(sys.argv[1])):
    store.submit([NewJob("count", {"steps": 2, "step_s": 0.0, "seed": i}, f"h{i}")])
"""


def test_four_submitters_and_two_engines_run_every_job_once(tmp_path, store_url, store):
    engines = [start_engine(tmp_path, f"engine{i}", slots=2) for i in range(2)]
    try:
        submitters = [
            subprocess.Popen(
                [sys.executable, "-c", SUBMITTER, "3"],
                env=engine_env(),
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
        outputs = [p.communicate(timeout=60) for p in submitters]
        assert [p.returncode for p in submitters] == [0] * 4, outputs
        wait_for(
            lambda: (
                len(store.list_jobs()) == 12
                and all(j.status in FINISHED for j in store.list_jobs())
            ),
            timeout=60,
            interval=0.2,
            what="12 jobs to finish",
        )
    finally:
        for e in engines:
            stop_engine(e)
    jobs = store.list_jobs()
    assert {j.status for j in jobs} == {"succeeded"}
    for j in jobs:
        assert [r.status for r in store.runs(j.id)] == ["succeeded"]
    used = {r.engine_id for j in jobs for r in store.runs(j.id)}
    assert len(used) == 2
    logs = "".join(p.read_text() for p in tmp_path.glob("*.log")) + "".join(
        out + err for out, err in outputs
    )
    assert "database is locked" not in logs


def test_cancel_a_task_that_ignores_stop_within_10_s(tmp_path, store):
    (job,) = store.submit([count_job(steps=100, step_s=0.05, hang_at=3, checkin_s=60)])
    engine = start_engine(tmp_path, MESA_CANCEL_GRACE_S="2")
    try:
        wait_for(lambda: store.job(job).latest.get("count/k0", -1) >= 2, what="running")
        child = int(store.runs(job)[0].external_id)
        started = time.monotonic()
        store.request_cancel(job)
        wait_for(lambda: store.job(job).status == "cancelled", timeout=10, what="cancelled")
        elapsed = time.monotonic() - started
        wait_for(lambda: not pid_alive(child), timeout=2, what="the child to be gone")
    finally:
        stop_engine(engine)
    assert elapsed < 10
    assert store.runs(job)[0].status == "cancelled"


def test_cooperative_cancel_and_failed_upstream_cancels_dependents(tmp_path, store):
    slow, failing, dependent = store.submit(
        [
            count_job(steps=200, step_s=0.05),
            count_job(steps=5, fail_at=1),
            NewJob("count", {"steps": 1}, "dep", depends_on=(("#1", "upstream"),)),
        ]
    )
    engine = start_engine(tmp_path, slots=2)
    try:
        wait_for(lambda: store.job(failing).status in FINISHED, what="the failure")
        wait_for(lambda: store.job(slow).status == "running", what="running")
        started = time.monotonic()
        store.request_cancel(slow)
        wait_for(lambda: store.job(slow).status == "cancelled", timeout=10, what="cancelled")
        assert time.monotonic() - started < 3  # the task stopped at its next step
    finally:
        stop_engine(engine)
    assert store.job(failing).status == "failed"
    assert "planned failure at step 1" in store.job(failing).error
    assert store.job(dependent).status == "cancelled"
    assert store.job(dependent).error == f"upstream job {failing} failed"


def test_missed_check_in_is_lost_and_retried(tmp_path, store):
    (job,) = store.submit([count_job(steps=6, step_s=0.01, hang_at=3, checkin_s=0.5)])
    engine = start_engine(tmp_path, MESA_CHECKIN_SLACK_S="0.5")
    try:
        wait_for(lambda: store.job(job).status in FINISHED, timeout=30, what="the retry")
        child = int(store.runs(job)[0].external_id)
    finally:
        stop_engine(engine)
    runs = store.runs(job)
    assert [r.status for r in runs] == ["lost", "succeeded"]
    assert "missed its check-in" in runs[0].error
    assert not pid_alive(child)
    assert [p.step for p in store.metric_series(job, "count/k0")] == list(range(6))
    assert os.path.isdir(store.job_detail(job).workdir)


@pytest.mark.slow
def test_kill_9_during_real_training_resumes_from_the_epoch_checkpoint(tmp_path, store, cifar10):
    from engine.pipelines import reference_hash
    from engine.specs import build_spec

    spec = build_spec(
        "train",
        "cpu-quick",
        None,
        {
            "epochs": 4,
            "eval_every": 1,
            "max_train_images": 1024,
            "max_test_images": 500,
            "eval_batch_size": 500,
        },
    ).to_json()
    (job,) = store.submit([NewJob("train", spec, reference_hash(spec), label="real")])
    first = start_engine(tmp_path, "first")
    try:
        from pathlib import Path

        from engine.tasks.train import CHECKPOINT

        wait_for(
            lambda: (
                len(store.metric_series(job, "eval/acc_clean")) >= 1
                and (Path(store.job_detail(job).workdir) / CHECKPOINT).exists()
            ),
            timeout=120,
            interval=0.2,
            what="the first epoch's checkpoint",
        )
        first.send_signal(signal.SIGKILL)
        first.wait()
        second = start_engine(tmp_path, "second")
        try:
            wait_for(lambda: store.job(job).status in FINISHED, timeout=180, what="the retry")
        finally:
            stop_engine(second)
    finally:
        stop_engine(first)
    detail = store.job_detail(job)
    assert detail.job.status == "succeeded", detail.job.error
    assert [r.status for r in detail.runs] == ["lost", "succeeded"]
    assert any("resumed from the checkpoint" in e.message for e in store.logs(job_id=job))
    evals = store.metric_series(job, "eval/acc_clean")
    assert len(evals) == 4 and len({p.step for p in evals}) == 4
    assert evals[0].attempt == 1 and evals[-1].attempt == 2
    assert detail.runs[1].env["torch"] and detail.runs[1].env["dataset_hash"]
