"""The task contract: ``run(spec, reporter) -> TaskResult``.

A task speaks only through its reporter. The foreground CLI, the engine's runner and the tests
each pass their own reporter; the task code is the same everywhere.

Metric keys are ``stage/name`` or ``stage/param=value/name`` (``train/loss``, ``eval/asr``,
``mesa/beta=0.9/hinge``); the TUI and the reports find series by these patterns.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from engine.errors import Cancelled


@dataclass
class TaskResult:
    """What a task returns; ``to_json`` is the object every ``--json`` command prints."""

    artifact: str | None
    metrics: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-safe: NaN and infinities (a metric that has no value) become null."""
        out: dict[str, Any] = {"artifact": self.artifact, "metrics": _finite(self.metrics)}
        out.update(_finite(self.extra))
        return out


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


@runtime_checkable
class Reporter(Protocol):
    """How a task reports. ``workdir`` is stable across retries of the same job."""

    workdir: Path
    resume: bool

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record metric values at a step (monotone within a stage)."""

    def check_in(self, next_within_s: float) -> None:
        """Promise another call (log or check_in) within ``next_within_s`` seconds."""

    def artifact(self, path: str | Path, kind: str) -> None:
        """Announce a finished artifact directory."""

    def should_stop(self) -> bool:
        """True when the task has been asked to stop; tasks call ``stop_point`` between steps."""

    def text(self, message: str, level: str = "info") -> None:
        """A log line for people."""

    def progress(self, stage: str, done: int, total: int, info: dict[str, float]) -> None:
        """Progress within a stage (drives progress bars; not stored as metrics)."""


def stop_point(reporter: Reporter) -> None:
    """Raise ``Cancelled`` when the reporter says stop; call between steps."""
    if reporter.should_stop():
        raise Cancelled("stop requested")


class NullReporter:
    """Reports nowhere and never asks to stop: what a computation run without a reporter (a
    benchmark, a test) reports to, so the computations never test for one."""

    workdir = Path(".")
    resume = False

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def check_in(self, next_within_s: float) -> None:
        pass

    def artifact(self, path: str | Path, kind: str) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def text(self, message: str, level: str = "info") -> None:
        pass

    def progress(self, stage: str, done: int, total: int, info: dict[str, float]) -> None:
        pass


NULL_REPORTER = NullReporter()


def or_null(reporter: Reporter | None) -> Reporter:
    """``reporter``, or the reporter that reports nowhere."""
    return NULL_REPORTER if reporter is None else reporter


class MemoryReporter:
    """Keeps everything in lists; used by tests and as a base for other reporters."""

    def __init__(self, workdir: str | Path, resume: bool = False, stop_after: int | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.resume = resume
        self.metrics: list[tuple[int, str, float]] = []
        self.artifacts: list[tuple[str, str]] = []
        self.lines: list[tuple[str, str]] = []
        self.check_ins: list[float] = []
        self.progress_calls = 0
        self._stop_after = stop_after
        self._stop_polls = 0
        self.started = time.monotonic()

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.metrics.append((int(step), key, float(value)))

    def check_in(self, next_within_s: float) -> None:
        self.check_ins.append(float(next_within_s))

    def artifact(self, path: str | Path, kind: str) -> None:
        self.artifacts.append((str(path), kind))

    def should_stop(self) -> bool:
        self._stop_polls += 1
        return self._stop_after is not None and self._stop_polls > self._stop_after

    def text(self, message: str, level: str = "info") -> None:
        self.lines.append((level, message))

    def progress(self, stage: str, done: int, total: int, info: dict[str, float]) -> None:
        self.progress_calls += 1

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(s, v) for s, k, v in self.metrics if k == key]

    def last(self, key: str) -> float | None:
        values = self.series(key)
        return values[-1][1] if values else None
