"""A small finished study written straight through the store API the engine uses (claim_jobs,
record_events, finish_run), with artifacts on disk as the tasks write them: no torch, a second.

The cpu-mini template with the target given (3 triggers x train, mesa, 4 defenses = 18 jobs).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from engine.pipelines import build_study
from engine.report.collect import trigger_pattern
from store.repository import RunEvents, Store

BETAS = ("0.9", "0.8", "0.5")
METHOD_ASR = {"mesa-ensemble": 0.03, "ideal": 0.02, "point": 0.2, "finetune": 0.5}
TRIGGER_SHIFT = {"bw:170": 0.0, "bw:0": 0.1, "bw:85": 0.05}
SAMPLES = 40


def _manifest(directory: Path, kind: str, upstream: list[str] | None = None, **meta) -> None:
    data = {
        "kind": kind,
        "files": [],
        "upstream": [{"path": u} for u in upstream or []],
        "meta": meta,
    }
    (directory / "manifest.json").write_text(json.dumps(data))


def _env(seed: int) -> dict:
    return {
        "seed": seed,
        "code_version": "0.1.0+gtest",
        "python": "3.11.9",
        "host": "test-host",
        "torch": "2.14.1",
        "cuda": "",
        "device_name": "cpu",
        "dataset_hash": "d" * 64,
    }


def _finish(store: Store, claimed, root: Path, rng: np.random.Generator) -> None:
    spec = claimed.spec
    events = RunEvents(claimed.run_id, claimed.job_id)
    now = time.time()
    seed = int(spec.get("seed", 0))
    events.env = _env(seed)
    metrics: list[tuple[str, int, float, float]] = []
    result: dict = {"metrics": {}}
    directory = root / f"{claimed.kind}-{claimed.job_id}"
    directory.mkdir(parents=True)
    if claimed.kind == "train":
        trigger = spec["trigger"]
        for step in range(1, 41):
            metrics.append(("train/loss", step, 2.0 / step, now))
        for epoch in range(1, 5):
            step = 10 * epoch
            metrics += [
                ("train/epoch", step, float(epoch), now),
                ("eval/acc_clean", step, 0.5 + 0.08 * epoch, now),
                ("eval/asr", step, 0.2 * epoch + 0.15, now),
            ]
        result["metrics"] = {"eval/asr": 0.95 + TRIGGER_SHIFT[trigger] / 10, "eval/acc_clean": 0.82}
        metrics.append(("memory/peak_mb", 40, 900.0, now))
        (directory / "ground_truth.json").write_text(
            json.dumps(
                {"trigger": trigger, "pattern": trigger_pattern(trigger).tolist(), "target": 0}
            )
        )
        _manifest(directory, "model")
    elif claimed.kind == "mesa":
        model = root / f"train-{claimed.inputs['model']}"
        histograms = {}
        for b in BETAS:
            for step in range(10, 101, 10):
                metrics += [
                    (f"mesa/beta={b}/hinge", step, 1.0 / step, now),
                    (f"mesa/beta={b}/mine", step, 0.01 * step, now),
                ]
            metrics += [
                (f"mesa/beta={b}/validity", 50, 0.5, now),
                (f"mesa/beta={b}/validity", 100, 0.9, now),
                (f"mesa/beta={b}/knn_entropy", 100, 1.5, now),
            ]
            result["metrics"][f"mesa/beta={b}/validity"] = 0.9
            histograms[f"mesa/beta={b}"] = [0, 0, 1, 1, 2, 3, 5, 8, 10, 10]
            sub = directory / f"beta={b}"
            sub.mkdir()
            np.save(sub / "samples.npy", rng.random((SAMPLES, 3, 3, 3), dtype=np.float32))
        result.update({"histograms": histograms, "target": 0, "betas": [0.9, 0.8, 0.5]})
        _manifest(directory, "search", [str(model)], model=str(model))
    elif claimed.kind == "defend":
        trigger = next(t for t in TRIGGER_SHIFT if t in store.job(claimed.job_id).label)
        asr = METHOD_ASR[_method(spec)] + TRIGGER_SHIFT[trigger]
        for epoch in range(0, 4):
            metrics += [
                ("eval/asr", epoch, 0.95 - (0.95 - asr) * epoch / 3, now),
                ("eval/acc_clean", epoch, 0.82 - 0.01 * epoch, now),
            ]
            if epoch:
                metrics.append(("repair/loss", epoch, 1.0 / epoch, now))
        result["metrics"] = {
            "eval/asr": asr,
            "eval/acc_clean": 0.79,
            "eval/ra": 0.7,
            "before/acc_clean": 0.82,
        }
        _manifest(directory, "repaired")
    metrics.append(("resource/peak_rss_mb", 0, 1200.0 + claimed.job_id, now))
    events.metrics = metrics
    events.artifacts = [(str(directory), claimed.kind, "ab" * 32, 1000)]
    store.record_events([events])
    result["artifact"] = str(directory)
    store.finish_run(claimed.run_id, "succeeded", result=result)


def _method(spec: dict) -> str:
    if spec.get("method") == "mesa":
        return "mesa-ensemble"
    return spec["method"]


def make_study(root: Path, name: str = "mini", store: Store | None = None) -> Store:
    """Create and finish the study in the default store (the test's MESA_TUI_HOME)."""
    store = store or Store()
    params, jobs = build_study("cpu-mini", [0], {}, "oracle")
    store.create_study(name, "cpu-mini", params, jobs)
    engine = store.register_engine("test-host", 1, "test", 8)
    rng = np.random.default_rng(0)
    while True:
        claimed = store.claim_jobs(
            engine.id,
            8,
            host="test-host",
            executor="local",
            code_version="0.1.0+gtest",
            workdir_for=lambda kind, job_id: str(root / f"work-{kind}-{job_id}"),
            startup_grace_s=60,
        )
        if not claimed:
            break
        for c in claimed:
            _finish(store, c, root, rng)
    return store
