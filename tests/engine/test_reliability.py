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
    engine = start_engine(tmp_path, MESA_TUI_CANCEL_GRACE_S="2")
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
        store.request_cancel(slow)
        wait_for(lambda: store.job(slow).status == "cancelled", timeout=10, what="cancelled")
    finally:
        stop_engine(engine)
    # The task stopped at its next step and reported it (exit 3), before any SIGTERM (-15): a
    # check on the path, not on a time sized for one CPU.
    assert store.runs(slow)[0].exit_code == 3
    assert store.job(failing).status == "failed"
    assert "planned failure at step 1" in store.job(failing).error
    assert store.job(dependent).status == "cancelled"
    assert store.job(dependent).error == f"upstream job {failing} failed"


def test_missed_check_in_is_lost_and_retried(tmp_path, store):
    (job,) = store.submit([count_job(steps=6, step_s=0.01, hang_at=3, checkin_s=0.5)])
    engine = start_engine(tmp_path, MESA_TUI_CHECKIN_SLACK_S="0.5")
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


# ------------------------------------------------------------------------------------------------
# Real tasks killed at an exact instant (MESA_TUI_TEST_CRASH, engine/crashpoints.py), then compared
# with an uninterrupted run of the same spec and seed in the same environment (one thread).

PLANTED = (
    "count=tests.engine.counting_task,mesa=tests.engine.planted_mesa,"
    "defend=tests.engine.planted_defend"
)
VOLATILE = ("time/", "perf/", "memory/", "resource/")


def stable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith(VOLATILE)}


def kill_then_compare(
    tmp_path, store, kind: str, spec: dict, crash: str, **first_env: str
) -> tuple[int, int]:
    """Run a job under the crash point (its first attempt dies there; a child-side kill is
    retried by the same engine), then the same spec uninterrupted; check that the job's series
    hold each (key, step) once, all from its last attempt, equal to the uninterrupted ones, and
    that the results are equal. Returns (job, reference)."""
    env = {"MESA_TUI_THREADS": "1", "MESA_TUI_TASK_MODULES": PLANTED}
    (job,) = store.submit([NewJob(kind, spec, f"{kind}-crashed", label="crashed")])
    first = start_engine(tmp_path, "first", MESA_TUI_TEST_CRASH=crash, **env, **first_env)
    try:
        wait_for(
            lambda: first.poll() is not None or store.job(job).status in FINISHED,
            timeout=300,
            interval=0.1,
            what="the crash or the job's end",
        )
        if first.poll() is not None:
            assert first.returncode == -signal.SIGKILL
            # The orphaned child stops by itself at its next report (after any checkpoint it
            # was about to write): wait for that, so the retry meets what it left.
            child = int(store.runs(job)[0].external_id)
            wait_for(lambda: not pid_alive(child), timeout=60, what="the orphaned child to end")
    finally:
        stop_engine(first)
    (reference,) = store.submit([NewJob(kind, spec, f"{kind}-reference", label="reference")])
    second = start_engine(tmp_path, "second", **env)
    try:
        wait_for(
            lambda: {store.job(j).status for j in (job, reference)} <= FINISHED,
            timeout=300,
            interval=0.1,
            what="the retry and the uninterrupted run",
        )
    finally:
        stop_engine(second)
    detail, ref = store.job_detail(job), store.job_detail(reference)
    assert ref.job.status == "succeeded", ref.job.error
    assert detail.job.status == "succeeded", detail.job.error
    assert [r.status for r in detail.runs] == ["lost", "succeeded"]
    replayed = [
        e.message for e in store.logs(run_ids=[detail.runs[1].id]) if "replayed" in e.message
    ]
    assert replayed and not replayed[0].endswith("(0 metric points replayed from metrics.journal)")
    keys = store.metric_keys(job)
    assert stable(dict.fromkeys(keys)) == stable(dict.fromkeys(store.metric_keys(reference)))
    for key in keys:
        series = store.metric_series(job, key)
        assert len({p.step for p in series}) == len(series), key
        assert {p.attempt for p in series} == {2}, key
        if not key.startswith(VOLATILE):
            want = [(p.step, p.value) for p in store.metric_series(reference, key)]
            assert [(p.step, p.value) for p in series] == want, key
    assert stable(detail.result["metrics"]) == stable(ref.result["metrics"])
    return job, reference


@pytest.mark.slow
def test_kill_9_during_real_training_resumes_from_the_epoch_checkpoint(tmp_path, store, cifar10):
    """The case that failed on a faster CPU: the child wrote the epoch-2 checkpoint and the
    engine died still holding the epoch-2 evaluation (step 4) unwritten; the retry resumes after
    epoch 2, so only the journal still has step 4. Made exact: the first engine writes no batch
    on its timer (MESA_TUI_FLUSH_EVERY_S, standing for a CPU that outpaces the 0.2 s flush) and dies
    on receiving epoch 3's first loss, which the child sends only after that checkpoint."""
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
    epoch_steps = 1024 // spec["batch_size"]
    step = 2 * epoch_steps
    job, reference = kill_then_compare(
        tmp_path,
        store,
        "train",
        spec,
        f"engine-received:key=train/loss@{step + 1}",
        MESA_TUI_FLUSH_EVERY_S="3600",
    )
    first, second = store.runs(job)
    stored = [p.step for p in store.metrics_since([first.id], keys=["eval/acc_clean"])]
    assert step not in stored  # the dead engine never wrote it
    assert second.start_step == step + 1  # resumed after the epoch-2 checkpoint
    assert any(
        f"resumed from the checkpoint after epoch 2 (step {step})" in e.message
        for e in store.logs(run_ids=[second.id])
    )
    evals = store.metric_series(job, "eval/acc_clean")
    assert [p.step for p in evals] == [epoch_steps * e for e in range(1, 5)]
    assert second.env["torch"] and second.env["dataset_hash"]


@pytest.fixture
def planted(isolated_home, tmp_path):
    """The synthetic dataset and planted-backdoor model of the defend tests."""
    from engine.catalog import imported_path
    from engine.ml.artifacts import GroundTruth, ModelMeta, save_model
    from engine.ml.data import _save_arrays
    from tests.ml.planted import CLASSES, SIZE, PlantedBackdoor, checker_pattern, synthetic

    train_x, train_y = synthetic(64, seed=1)
    test_x, test_y = synthetic(300, seed=2)
    arrays = {
        "train_x": train_x.numpy(),
        "train_y": train_y.numpy(),
        "test_x": test_x.numpy(),
        "test_y": test_y.numpy(),
    }
    names = [str(i) for i in range(CLASSES)]
    _save_arrays(imported_path("synth-defend"), arrays, names, (0.0,) * 3, (1.0,) * 3, "test")
    meta = ModelMeta("planted", CLASSES, 3, (SIZE, SIZE), (0.0,) * 3, (1.0,) * 3, "synth-defend")
    truth = GroundTruth("bw:170", checker_pattern(), 1, "per-image")
    return save_model(tmp_path / "model", PlantedBackdoor(), meta, ground_truth=truth)


@pytest.mark.slow
def test_kill_9_of_engine_and_child_during_a_mesa_search(tmp_path, store, planted):
    """Both die as the child sends the step-4 statistics (the search checkpointed at step 2)."""
    from engine.specs import build_spec

    spec = build_spec(
        "mesa",
        overrides=dict(
            model=str(planted),
            target=1,
            betas="0.9,0.5",
            steps=8,
            batch_size=16,
            hidden=16,
            stats_every=2,
            sample_every=3,
            n_eval_triggers=8,
            eval_images=16,
            samples=64,
            device="cpu",
            precision="fp32",
        ),
    ).to_json()
    job, _ = kill_then_compare(tmp_path, store, "mesa", spec, "both:key=mesa/beta=0.9/hinge@4")
    assert any(
        "resumed from the checkpoint at step 2" in e.message
        for e in store.logs(run_ids=[store.runs(job)[1].id])
    )


@pytest.mark.slow
def test_kill_9_of_the_child_during_a_repair(tmp_path, store, planted):
    """The child dies with the second repair epoch's metrics in the journal and not yet sent."""
    from engine.specs import build_spec

    spec = build_spec(
        "defend",
        overrides=dict(
            model=str(planted),
            method="random-patch",
            target=1,
            epochs=3,
            lr=0.05,
            batch_size=50,
            stamp_rate=0.5,
            channels_last=False,
            residual_steps=0,
            variations=False,
            device="cpu",
            precision="fp32",
        ),
    ).to_json()
    job, _ = kill_then_compare(tmp_path, store, "defend", spec, "child-journaled:key=repair/loss@2")
    first, second = store.runs(job)
    assert 2 not in [p.step for p in store.metrics_since([first.id], keys=["repair/loss"])]
    assert any(
        "resumed the repair after epoch 1" in e.message for e in store.logs(run_ids=[second.id])
    )
