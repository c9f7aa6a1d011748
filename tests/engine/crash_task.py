"""A test-only task kind ("crash") for the Ray executor: on its first attempt it kills the Ray
worker that runs it (its parent process), as a dead node or an OOM kill would; later attempts run
to the end. Registered through ``MESA_TUI_TASK_MODULES=crash=tests.engine.crash_task``; never run it
under the local executor, whose child's parent is the engine itself."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from engine.reporter import Reporter, TaskResult, stop_point
from engine.specs import SpecBase


class Spec(SpecBase):
    kind: Literal["crash"] = "crash"
    steps: int = Field(4, ge=1)
    crash_at: int = Field(1, ge=0)


def run(spec: Spec, reporter: Reporter) -> TaskResult:
    for step in range(spec.steps):
        stop_point(reporter)
        if step == spec.crash_at and not reporter.resume:
            reporter.text(f"killing the ray worker {os.getppid()} at step {step}")
            os.kill(os.getppid(), signal.SIGKILL)
            time.sleep(60)  # the worker's death takes this child with it
        reporter.log({"crash/step": float(step)}, step)
        reporter.check_in(30)
    out = Path(reporter.workdir) / "out"
    out.mkdir(exist_ok=True)
    (out / "manifest.json").write_text("{}")
    reporter.artifact(out, "crash")
    return TaskResult(artifact=str(out), metrics={"crash/steps": float(spec.steps)})
