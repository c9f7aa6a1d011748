"""A fast test-only task kind ("count") for engine mechanics, registered through
``MESA_TASK_MODULES=count=tests.engine.counting_task``. It counts steps, checkpoints its step in
the work directory and resumes from it, like the train task does with its epochs."""

from __future__ import annotations

import json
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


def run(spec: Spec, reporter: Reporter) -> TaskResult:
    checkpoint = Path(reporter.workdir) / "checkpoint.json"
    start = 0
    if reporter.resume and checkpoint.exists():
        start = json.loads(checkpoint.read_text())["step"] + 1
        reporter.text(f"resuming at step {start}")
    for step in range(start, spec.steps):
        stop_point(reporter)
        if spec.fail_at == step:
            raise RuntimeError(f"planned failure at step {step}")
        if spec.hang_at == step and not reporter.resume:
            time.sleep(3600)
        time.sleep(spec.step_s)
        reporter.log({f"count/k{k}": float(step) for k in range(spec.keys)}, step)
        reporter.check_in(spec.checkin_s)
        reporter.progress("count", step + 1, spec.steps, {})
        if (step + 1) % spec.checkpoint_every == 0:
            checkpoint.write_text(json.dumps({"step": step}))
    out = Path(reporter.workdir) / "out"
    out.mkdir(exist_ok=True)
    (out / "value.txt").write_text(str(spec.steps))
    (out / "manifest.json").write_text(json.dumps({"kind": "count", "upstream": spec.upstream}))
    reporter.artifact(out, "count")
    return TaskResult(artifact=str(out), metrics={"count/final": float(spec.steps)})
