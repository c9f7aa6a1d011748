"""A fast test-only task kind ("count") for engine mechanics, registered through
``MESA_TASK_MODULES=count=tests.engine.counting_task``. It counts steps, checkpoints its step in
the work directory (atomically, like the real tasks) and resumes from it, like the train task
does with its epochs. With ``running_sum`` it also logs ``count/sum``, a seeded running sum kept
in the checkpoint, so a resume from the wrong state shows in the values and in the result."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from engine.reporter import Reporter, TaskResult, stop_point
from engine.specs import SpecBase


class Spec(SpecBase):
    kind: Literal["count"] = "count"
    steps: int = Field(20, ge=1)
    step_s: float = Field(0.05, ge=0)
    checkpoint_every: int = Field(5, ge=1)
    keys: int = Field(1, ge=1, description="metric keys logged per step")
    fail_at: int | None = None
    hang_at: int | None = Field(None, description="stop reporting at this step (first attempt)")
    checkin_s: float = Field(30.0, gt=0)
    upstream: str | None = None
    running_sum: bool = False


def increment(seed: int, step: int) -> float:
    return ((step + 1) * 2654435761 + seed) % 1000 / 1000


def run(spec: Spec, reporter: Reporter) -> TaskResult:
    checkpoint = Path(reporter.workdir) / "checkpoint.json"
    start, total = 0, 0.0
    if reporter.resume and checkpoint.exists():
        saved = json.loads(checkpoint.read_text())
        start, total = saved["step"] + 1, saved.get("total", 0.0)
        reporter.text(f"resuming at step {start}")
    for step in range(start, spec.steps):
        stop_point(reporter)
        if spec.fail_at == step:
            raise RuntimeError(f"planned failure at step {step}")
        if spec.hang_at == step and not reporter.resume:
            time.sleep(3600)
        time.sleep(spec.step_s)
        values = {f"count/k{k}": float(step) for k in range(spec.keys)}
        if spec.running_sum:
            total += increment(spec.seed, step)
            values["count/sum"] = total
        reporter.log(values, step)
        reporter.check_in(spec.checkin_s)  # flushes the step's metrics before the checkpoint
        reporter.progress("count", step + 1, spec.steps, {})
        if (step + 1) % spec.checkpoint_every == 0:
            temporary = checkpoint.with_name(checkpoint.name + ".tmp")
            temporary.write_text(json.dumps({"step": step, "total": total}))
            os.replace(temporary, checkpoint)  # a kill mid-write leaves the old one whole
    out = Path(reporter.workdir) / "out"
    out.mkdir(exist_ok=True)
    (out / "value.txt").write_text(str(spec.steps))
    (out / "manifest.json").write_text(json.dumps({"kind": "count", "upstream": spec.upstream}))
    reporter.artifact(out, "count")
    metrics = {"count/final": float(spec.steps)}
    if spec.running_sum:
        metrics["count/sum"] = total
    return TaskResult(artifact=str(out), metrics=metrics)
