"""Recording foreground runs (``mesa-tui run <kind>``) in the store, so the TUI shows them too.

``mesa_tui.foreground`` calls ``ForegroundRecorder.start(kind, spec)``, runs the task with
``recorder.wrap(reporter)`` and ends with ``recorder.finish(result, exc)``. The foreground process
is the writer of its own run. A store problem never stops the run: the recorder prints one
warning and stops recording.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

# Buffered metrics are written at most this often (one short transaction each).
FLUSH_INTERVAL_S = 0.5


class ForegroundRecorder:
    def __init__(self, store: Any, job_id: int, run_id: int):
        from store.repository import RunEvents

        self.store = store
        self.job_id = job_id
        self.run_id = run_id
        self.events = RunEvents(run_id, job_id)
        self.enabled = True
        self._last_flush = time.monotonic()

    @classmethod
    def start(cls, kind: str, spec: Any) -> ForegroundRecorder:
        """Open the job and run rows (raises when the store cannot be opened)."""
        from engine.version import code_version
        from store.repository import Store

        store = Store()
        spec_json = spec.to_json()
        label = " ".join(
            f"{k}={spec_json[k]}"
            for k in ("trigger", "method", "target")
            if spec_json.get(k) is not None
        )
        job_id, run_id = store.start_foreground(
            kind,
            spec_json,
            spec.spec_hash(),
            label=label,
            host=socket.gethostname(),
            pid=os.getpid(),
            code_version=code_version(),
        )
        recorder = cls(store, job_id, run_id)
        from engine.runner import dataset_hash

        recorder.events.env = {
            "seed": getattr(spec, "seed", None),
            "code_version": code_version(),
            "dataset_hash": dataset_hash(getattr(spec, "dataset", None)),
        }
        return recorder

    def wrap(self, reporter: Any) -> RecordingReporter:
        return RecordingReporter(reporter, self)

    def _warn(self, exc: BaseException) -> None:
        if self.enabled:
            self.enabled = False
            print(f"warning: stopped recording this run in the store ({exc})", file=sys.stderr)

    def flush(self, force: bool = False) -> None:
        if not self.enabled or self.events.empty():
            return
        if not force and time.monotonic() - self._last_flush < FLUSH_INTERVAL_S:
            return
        self._last_flush = time.monotonic()
        try:
            self.store.record_events([self.events])
            self.events.clear()
        except Exception as exc:
            self._warn(exc)

    def finish(self, result: Any, exc: BaseException | None) -> None:
        """Close the run: succeeded with the result, cancelled on Ctrl-C, failed otherwise."""
        if not self.enabled:
            return
        try:
            self._add_environment()
            self.flush(force=True)
            if exc is None:
                self.store.finish_run(
                    self.run_id, "succeeded", exit_code=0, result=result.to_json()
                )
            else:
                from engine.errors import Cancelled

                cancelled = isinstance(exc, KeyboardInterrupt | Cancelled)
                self.store.finish_run(
                    self.run_id,
                    "cancelled" if cancelled else "failed",
                    exit_code=130 if cancelled else 1,
                    error=str(exc) or type(exc).__name__,
                )
        except Exception as store_exc:
            self._warn(store_exc)

    def _add_environment(self) -> None:
        env = dict(self.events.env)
        torch = sys.modules.get("torch")
        if torch is not None:
            env.update(torch=torch.__version__, cuda=torch.version.cuda or "")
            env["device_name"] = (
                torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
            )
        self.events.env = env


class RecordingReporter:
    """Passes every call to the foreground reporter and records it in the store."""

    def __init__(self, inner: Any, recorder: ForegroundRecorder):
        self.inner = inner
        self.recorder = recorder
        self.workdir = inner.workdir
        self.resume = inner.resume

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.inner.log(metrics, step)
        now = time.time()
        self.recorder.events.metrics.extend(
            (k, int(step), float(v), now) for k, v in metrics.items()
        )
        self.recorder.flush()

    def check_in(self, next_within_s: float) -> None:
        self.inner.check_in(next_within_s)

    def artifact(self, path: str | Path, kind: str) -> None:
        self.inner.artifact(path, kind)
        from engine.runner import artifact_identity

        resolved = Path(path).resolve()
        try:
            sha, size = artifact_identity(resolved)
        except OSError:
            sha, size = None, None
        self.recorder.events.artifacts.append((str(resolved), kind, sha, size))
        self.recorder.flush(force=True)

    def should_stop(self) -> bool:
        return self.inner.should_stop()

    def text(self, message: str, level: str = "info") -> None:
        self.inner.text(message, level)
        self.recorder.events.logs.append((level, str(message), time.time()))

    def progress(self, stage: str, done: int, total: int, info: dict[str, float]) -> None:
        self.inner.progress(stage, done, total, info)
        self.recorder.events.progress = {
            "stage": stage,
            "done": int(done),
            "total": int(total),
            "info": {k: float(v) for k, v in (info or {}).items()},
            "wall_time": time.time(),
        }
        self.recorder.flush()
