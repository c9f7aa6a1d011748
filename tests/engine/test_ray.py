"""The Ray executor on a real local Ray instance (one per module): tiny jobs run as Ray tasks,
their events reach the store through the engine, artifacts land in the artifact directory (shared
or copied back), cancels go through Ray, and a dead Ray worker is a lost run that our runs table
retries."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.daemon import Engine, EngineConfig
from store.entities import NewJob
from store.repository import Store
from tests.engine.helpers import FINISHED, ROOT, engine_env, stop_engine, wait_for

ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]')")
pytestmark = pytest.mark.ray

TASKS = "count=tests.engine.counting_task,crash=tests.engine.crash_task"


@pytest.fixture(scope="module")
def ray_cluster():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def ray_engine(ray_cluster, monkeypatch):
    """Start an engine with the Ray executor in a thread of this process (the module's Ray)."""
    monkeypatch.setenv("MESA_TUI_TASK_MODULES", TASKS)
    monkeypatch.setenv("MESA_TUI_CANCEL_GRACE_S", "2")
    started = []

    def start(artifacts: str = "shared", slots: int = 2) -> Engine:
        engine = Engine(
            EngineConfig(cpu_slots=slots, executor="ray", ray_artifacts=artifacts), Store()
        )
        thread = threading.Thread(target=engine.run, daemon=True)
        thread.start()
        started.append((engine, thread))
        return engine

    yield start
    for engine, thread in started:
        engine.request_stop()
        thread.join(30)
        assert not thread.is_alive()


def count_job(label: str, **spec) -> NewJob:
    return NewJob("count", {"step_s": 0.02, **spec}, f"count-{label}", label=label)


def wait_finished(store: Store, jobs: list[int], timeout: float = 60) -> None:
    wait_for(
        lambda: all(store.job(j).status in FINISHED for j in jobs),
        timeout=timeout,
        interval=0.1,
        what=f"jobs {jobs} to finish",
    )


def test_jobs_run_as_ray_tasks_and_artifacts_reach_the_store(ray_engine):
    store = Store()
    first, second, dependent = store.submit(
        [
            count_job("a", steps=6),
            count_job("b", steps=6, keys=3),
            NewJob(
                "count",
                {"steps": 2, "step_s": 0.0, "upstream": "job:#0"},
                "dep",
                depends_on=(("#0", "upstream"),),
            ),
        ]
    )
    engine = ray_engine("shared")
    wait_finished(store, [first, second, dependent])
    assert engine.executor.name == "ray" and engine.executor.mode == "shared"
    for job in (first, second, dependent):
        detail = store.job_detail(job)
        assert detail.job.status == "succeeded", detail.job.error
        (run,) = detail.runs
        assert run.executor == "ray" and len(run.external_id) > 20  # a Ray task id
        assert run.env["cuda_visible_devices"] == ""  # device auto, no GPU in the cluster
        artifact = store.upstream_artifact(job)
        assert Path(artifact.path).is_dir() and (Path(artifact.path) / "manifest.json").exists()
        assert artifact.sha256
    assert [p.step for p in store.metric_series(first, "count/k0")] == list(range(6))
    assert set(store.job(second).latest) >= {"count/k0", "count/k1", "count/k2"}
    manifest = json.loads(
        (Path(store.upstream_artifact(dependent).path) / "manifest.json").read_text()
    )
    assert manifest["upstream"] == store.upstream_artifact(first).path
    (row,) = store.engines()
    assert row.executor == "ray" and row.slots == 2


def test_cancel_goes_through_ray(ray_engine):
    store = Store()
    polite, stubborn = store.submit(
        [
            count_job("polite", steps=2000, step_s=0.05),
            count_job("stubborn", steps=2000, step_s=0.05, hang_at=3, checkin_s=60),
        ]
    )
    ray_engine("shared")
    wait_for(
        lambda: all(store.job(j).latest.get("count/k0", -1) >= 2 for j in (polite, stubborn)),
        timeout=60,
        what="both running",
    )
    started = time.monotonic()
    store.request_cancel(polite)
    store.request_cancel(stubborn)
    wait_finished(store, [polite, stubborn], timeout=20)
    elapsed = time.monotonic() - started
    assert elapsed < 10
    for job in (polite, stubborn):
        assert store.job(job).status == "cancelled"
        assert [r.status for r in store.runs(job)] == ["cancelled"]
    # The cooperative stop reached the task (it raised Cancelled and reported it).
    assert store.runs(polite)[0].error == "cancelled by request"


def test_a_dead_ray_worker_is_a_lost_run_that_is_retried(ray_engine):
    store = Store()
    (job,) = store.submit([NewJob("crash", {"steps": 4, "crash_at": 1}, "crash", max_attempts=2)])
    ray_engine("shared")
    wait_finished(store, [job])
    detail = store.job_detail(job)
    assert detail.job.status == "succeeded", detail.job.error
    assert [r.status for r in detail.runs] == ["lost", "succeeded"]
    assert "ray worker lost" in detail.runs[0].error
    assert detail.runs[1].resumed
    # The retry's replay of the journal went through the hub like any event: every step once.
    series = store.metric_series(job, "crash/step")
    assert [(p.step, p.attempt) for p in series] == [(s, 2) for s in range(4)]
    assert any(
        "(1 metric points replayed" in e.message for e in store.logs(run_ids=[detail.runs[1].id])
    )


def test_copy_mode_brings_artifacts_back_through_the_object_store(ray_engine):
    store = Store()
    first, dependent = store.submit(
        [
            count_job("a", steps=3, checkpoint_every=1),
            NewJob(
                "count",
                {"steps": 2, "step_s": 0.0, "upstream": "job:#0"},
                "dep",
                depends_on=(("#0", "upstream"),),
            ),
        ]
    )
    engine = ray_engine("copy")
    wait_finished(store, [first, dependent])
    assert engine.executor.mode == "copy"
    for job in (first, dependent):
        summary = store.job(job)
        assert summary.status == "succeeded", summary.error
        artifact = Path(store.upstream_artifact(job).path)
        # The path the store names is on the engine's side, and the files are there.
        assert artifact.is_relative_to(engine.executor.artifacts_dir)
        assert (artifact / "value.txt").exists() and (artifact / "manifest.json").exists()
    # Everything the task left in its work directory came back, not only the artifact.
    assert (Path(store.job_detail(first).workdir) / "checkpoint.json").exists()
    manifest = json.loads(
        (Path(store.upstream_artifact(dependent).path) / "manifest.json").read_text()
    )
    # The task read its upstream from the copy staged on the node (a temporary directory there).
    assert manifest["upstream"].endswith(f"count-{first}/out")


def test_cli_engine_connects_to_a_running_cluster(ray_cluster, tmp_path):
    """`engine start --executor ray --ray-address HOST:PORT`, as a head node's address is given on
    a machine of the cluster; bad addresses are one-line errors with exit code 2."""
    store = Store()
    jobs = store.submit([count_job(str(i), steps=3) for i in range(3)])
    cli = [sys.executable, "-m", "mesa_tui.cli", "engine", "start"]
    env = engine_env(MESA_TUI_TASK_MODULES=TASKS)
    log = open(tmp_path / "engine.log", "ab")
    process = subprocess.Popen(
        [*cli, "--executor", "ray", "--ray-address", ray_cluster, "--cpu-slots", "2"],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_finished(store, jobs, timeout=90)
    finally:
        stop_engine(process)
    assert {store.job(j).status for j in jobs} == {"succeeded"}, (
        tmp_path / "engine.log"
    ).read_text()
    for args, message in [
        (["--executor", "slurm"], "unknown --executor 'slurm'; use local or ray"),
        (["--ray-address", "127.0.0.1:1"], "cannot reach the Ray cluster at --ray-address '127.0.0.1:1'"),
        (["--executor", "ray", "--ray-artifacts", "nfs"], "--ray-artifacts 'nfs' is unknown"),
    ]:  # fmt: skip
        out = subprocess.run([*cli, *args], env=env, cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 2 and message in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
