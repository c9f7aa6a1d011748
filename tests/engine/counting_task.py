"""A fast test-only task kind ("count") for engine mechanics, registered through
``MESA_TUI_TASK_MODULES=count=tests.engine.counting_task``. It counts steps, checkpoints its step in
the work directory (atomically, like the real tasks) and resumes from it, like the train task
does with its epochs. With ``running_sum`` it also logs ``count/sum``, a seeded running sum kept
in the checkpoint, so a resume from the wrong state shows in the values and in the result."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from engine.reporter import Reporter, TaskResult, stop_point


@dataclass(frozen=True)
class Spec:
    """A plain dataclass, not a pydantic spec: the crash sweep starts hundreds of these children,
    and pydantic with every job's spec model is half of a child's start-up."""

    kind: str = "count"
    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    steps: int = 20
    step_s: float = 0.05
    checkpoint_every: int = 5
    keys: int = 1  # metric keys logged per step
    fail_at: int | None = None
    hang_at: int | None = None  # stop reporting at this step (first attempt)
    checkin_s: float = 30.0
    upstream: str | None = None
    running_sum: bool = False

    def __post_init__(self) -> None:
        if self.kind != "count" or self.steps < 1 or self.checkpoint_every < 1 or self.keys < 1:
            raise ValueError(f"invalid count spec {self}")
        if self.step_s < 0 or self.checkin_s <= 0:
            raise ValueError(f"invalid count spec {self}")


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
