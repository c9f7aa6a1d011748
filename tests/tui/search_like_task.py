"""A test-only task kind ("searchlike", via ``MESA_TUI_TASK_MODULES``) that reports like a MESA search:
hinge and MINE curves per beta, and ``beta=<b>/samples.npy`` rewritten as it goes, in seconds and
without torch, so a test can watch a real engine fill the app's curves and trigger grid."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from engine.reporter import Reporter, TaskResult, stop_point
from engine.specs import SpecBase

PATTERN_170 = [[0, 1, 0], [1, 0, 1], [0, 1, 0]]


class Spec(SpecBase):
    kind: Literal["searchlike"] = "searchlike"
    steps: int = Field(30, ge=1)
    step_s: float = Field(0.05, ge=0)
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.5])
    samples_every: int = Field(5, ge=1)


def _save_samples(directory: Path, samples: np.ndarray) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "samples.part.npy"
    np.save(tmp, samples, allow_pickle=False)
    os.replace(tmp, directory / "samples.npy")


def run(spec: Spec, reporter: Reporter) -> TaskResult:
    workdir = Path(reporter.workdir)
    (workdir / "ground_truth.json").write_text(
        json.dumps(
            {
                "trigger": "bw:170",
                "pattern": [PATTERN_170] * 3,
                "target": 0,
                "placement": "per-image",
            }
        )
    )
    rng = np.random.default_rng(spec.seed)
    base = np.array(PATTERN_170, dtype=np.float32)[None, None]
    for step in range(spec.steps):
        stop_point(reporter)
        time.sleep(spec.step_s)
        values = {}
        for beta in spec.betas:
            values[f"mesa/beta={beta}/hinge"] = beta * (1 - np.exp(-step / 10))
            values[f"mesa/beta={beta}/mine"] = 1 + np.log1p(step) * beta
        reporter.log(values, step)
        reporter.progress("search", step + 1, spec.steps, {})
        reporter.check_in(30)
        if (step + 1) % spec.samples_every == 0:
            for i, beta in enumerate(spec.betas):
                noise = rng.normal(0, 0.1 + 0.1 * i, size=(32, 3, 3, 3)).astype(np.float32)
                _save_samples(workdir / f"beta={beta}", np.clip(base + noise, 0, 1))
    reporter.artifact(workdir, "search")
    return TaskResult(
        artifact=str(workdir), metrics={f"mesa/beta={b}/validity": 0.9 for b in spec.betas}
    )
