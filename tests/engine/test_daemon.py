"""Engine pieces without a full run: slots, GPU figures through NVML, GPU pinning, imports."""

from __future__ import annotations

import subprocess
import sys
import types

from engine.daemon import (
    EngineConfig,
    build_flags,
    flag_parser,
    gpu_snapshot,
    make_slots,
    visible_gpus,
)
from store.entities import NewJob
from store.repository import Store
from tests.engine.helpers import ROOT, start_engine, stop_engine, wait_for


def test_slots_per_gpu_and_cpu_slots(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert [s.name for s in make_slots(EngineConfig(cpu_slots=3))] == ["cpu0", "cpu1", "cpu2"]
    slots = make_slots(EngineConfig(gpus=["0", "1"], slots_per_gpu=2))
    assert [(s.name, s.gpu) for s in slots] == [
        ("gpu0.0", "0"), ("gpu0.1", "0"), ("gpu1.0", "1"), ("gpu1.1", "1"),
    ]  # fmt: skip
    assert [s.name for s in make_slots(EngineConfig())] == ["cpu0"]  # no GPU visible
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus() == ["2", "3"]


def test_the_flags_a_detached_start_hands_on_parse_back_to_the_same_flags():
    flags = build_flags({"cpu_slots": "2", "gpus": "0,1", "ray_gpus": "0.5", "log": "/l"})
    assert flags.argv() == ["--cpu-slots", "2", "--gpus", "0,1", "--log", "/l", "--ray-gpus", "0.5"]
    parsed = vars(flag_parser().parse_args([*flags.argv(), "--store-checked"]))
    assert parsed.pop("store_checked") is True
    assert build_flags({k: v for k, v in parsed.items() if v is not None}) == flags


def test_gpu_figures_come_from_nvml_when_present(monkeypatch):
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: b"Fake GPU",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=2 * 2**30, total=80 * 2**30),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=37),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    (gpu,) = gpu_snapshot(["1"])
    assert gpu == {
        "index": 1, "name": "Fake GPU", "memory_used_mb": 2048.0, "memory_total_mb": 81920.0,
        "utilization_pct": 37.0,
    }  # fmt: skip
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: the index only
    assert gpu_snapshot(["0"]) == [{"index": 0, "name": "gpu 0"}]


def test_child_is_pinned_to_its_gpu_slot(tmp_path, store_url):
    store = Store()
    (job,) = store.submit([NewJob("count", {"steps": 2, "step_s": 0.0}, "h")])
    log = open(tmp_path / "engine.log", "ab")
    from tests.engine.helpers import engine_env

    process = subprocess.Popen(
        [sys.executable, "-m", "engine.daemon", "--gpus", "3"],
        env=engine_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for(lambda: store.job(job).status == "succeeded", timeout=30, what="the job")
    finally:
        stop_engine(process)
    run = store.runs(job)[0]
    assert run.gpu == "3" and run.env["cuda_visible_devices"] == "3"
    (engine,) = store.engines()
    assert engine.slots == 1 and engine.gpus[0].index == 3 and not engine.alive
    assert engine.system.cpus >= 1 and [s.gpu for s in engine.system.slots] == ["3"]


def test_daemon_runner_store_and_cli_modules_do_not_import_torch():
    code = (
        "import sys; import engine.daemon, engine.runner, engine.pipelines, engine.recording, "
        "store.repository, mesa_tui.commands.jobs, mesa_tui.commands.submit; "
        "print(sorted(m for m in ('torch', 'textual', 'mesa_tui') if m in sys.modules and "
        "not m.startswith('mesa_tui')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


def test_engine_stop_requeues_running_jobs_without_using_an_attempt(tmp_path, store_url):
    store = Store()
    (job,) = store.submit([NewJob("count", {"steps": 500, "step_s": 0.05}, "h")])
    engine = start_engine(tmp_path)
    try:
        wait_for(lambda: store.job(job).status == "running" and store.job(job).latest, what="run")
        store.request_engine_stop()
        engine.wait(20)
    finally:
        stop_engine(engine)
    summary = store.job(job)
    assert summary.status == "queued" and summary.max_attempts == 4
    assert [r.status for r in store.runs(job)] == ["lost"]


def test_dependent_job_receives_the_upstream_artifact(tmp_path, store_url):
    import json
    from pathlib import Path

    store = Store()
    first, second = store.submit(
        [
            NewJob("count", {"steps": 2, "step_s": 0.0}, "a"),
            NewJob(
                "count",
                {"steps": 2, "step_s": 0.0, "upstream": "job:#0"},
                "b",
                depends_on=(("#0", "upstream"),),
            ),
        ]
    )
    assert store.job(second).spec["upstream"] == f"job:{first}"
    engine = start_engine(tmp_path)
    try:
        wait_for(lambda: store.job(second).status == "succeeded", timeout=30, what="both jobs")
    finally:
        stop_engine(engine)
    upstream = store.upstream_artifact(first).path
    manifest = json.loads(
        (Path(store.upstream_artifact(second).path) / "manifest.json").read_text()
    )
    assert manifest["upstream"] == upstream
    assert f"inputs: upstream={upstream}" in [e.message for e in store.logs(job_id=second)]
