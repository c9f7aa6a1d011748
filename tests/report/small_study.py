"""A finished paper-cifar10-bw-small study written through the store API the engine uses
(claim_jobs, record_events, finish_run), each repair's artifact holding an ``outcomes.json`` of
seeded random per-image outcomes: no torch, about a second.

``make_small_study`` also returns the ``stats.summarize`` records built by hand from the same
outcomes, so a test can compare what ``engine.report.study_stats`` reads from the store with them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from engine.pipelines import build_study
from store.repository import RunEvents, Store

TRIGGERS = ("bw:0", "bw:1", "bw:85", "bw:170")
METHOD_ASR = {"mesa": 0.04, "point": 0.15, "ideal": 0.02, "finetune": 0.6}
ATTACK_ASR = {"bw:0": 0.97, "bw:1": 0.3, "bw:85": 0.95, "bw:170": 0.99}  # bw:1 did not implant
ASR_IMAGES, CLEAN_IMAGES = 180, 200


def _bits(rng: np.random.Generator, p: float, n: int) -> str:
    return "".join("1" if v else "0" for v in rng.random(n) < p)


def make_small_study(
    root: Path,
    store: Store | None = None,
    name: str = "small",
    without_outcomes: tuple[tuple[str, str], ...] = (),
    unfinished: tuple[tuple[str, str], ...] = (),
) -> tuple[Store, list[dict[str, Any]]]:
    """Create and finish the study; (trigger, label) pairs in ``without_outcomes`` finish with no
    outcomes.json, those in ``unfinished`` fail. Labels as the template's: mesa, point/0, ..."""
    store = store or Store()
    params, jobs = build_study("paper-cifar10-bw-small", [0], {}, None, list(TRIGGERS))
    _, ids = store.create_study(name, params["template"], params, jobs)
    about = {i: j for i, j in zip(ids, jobs, strict=True)}
    engine = store.register_engine("test-host", 1, "test", 8)
    rng = np.random.default_rng(0)
    before = {
        t: {"asr": _bits(rng, ATTACK_ASR[t], ASR_IMAGES), "clean": _bits(rng, 0.85, CLEAN_IMAGES)}
        for t in TRIGGERS
    }
    records = {
        t: {
            "schema": 1,
            "trigger": t,
            "target": 0,
            "rate": params["overrides"]["stamp_rate"],
            "floor": None,
            "attack": {"asr_outcomes": before[t]["asr"], "clean_outcomes": before[t]["clean"]},
            "repairs": {},
        }
        for t in TRIGGERS
    }
    while True:
        claimed = store.claim_jobs(
            engine.id,
            16,
            host="test-host",
            executor="local",
            code_version="0.1.0+gtest",
            workdir_for=lambda kind, job_id: str(root / f"work-{kind}-{job_id}"),
            startup_grace_s=60,
        )
        if not claimed:
            break
        for c in claimed:
            job = about[c.job_id]
            directory = root / f"{c.kind}-{c.job_id}"
            directory.mkdir(parents=True)
            events = RunEvents(c.run_id, c.job_id)
            events.artifacts = [(str(directory), c.kind, "ab" * 32, 1000)]
            store.record_events([events])
            result: dict[str, Any] = {"artifact": str(directory), "metrics": {}}
            label = job.label.split(" ")[0]
            if c.kind == "defend":
                if (job.trigger, label) in unfinished:
                    store.finish_run(c.run_id, "failed", error="test: left unfinished")
                    continue
                asr = METHOD_ASR[job.method] + 0.02 * (c.spec.get("point_index") or 0)
                after = {
                    "asr": _bits(rng, asr, ASR_IMAGES),
                    "clean": _bits(rng, 0.8, CLEAN_IMAGES),
                }
                run = {
                    "asr": after["asr"].count("1") / ASR_IMAGES,
                    "acc_clean": after["clean"].count("1") / CLEAN_IMAGES,
                }
                result["metrics"] = {"eval/asr": run["asr"], "eval/acc_clean": run["acc_clean"]}
                result["target"] = 0
                if (job.trigger, label) not in without_outcomes:
                    outcomes = {"before": before[job.trigger], "after": after}
                    (directory / "outcomes.json").write_text(json.dumps(outcomes))
                    run.update(asr_outcomes=after["asr"], clean_outcomes=after["clean"])
                    repairs = records[job.trigger]["repairs"]
                    if job.method == "point":
                        repairs.setdefault("point", {"restarts": []})["restarts"].append(run)
                    else:
                        repairs[job.method] = run
            store.finish_run(c.run_id, "succeeded", result=result)
    return store, [records[t] for t in TRIGGERS]
