"""Test-only crash points: ``MESA_TUI_TEST_CRASH`` makes the engine or a run's child SIGKILL itself
at a chosen instant of a job's first attempt, so tests can sweep the instants of a crash instead
of hoping a timer lands on one. Never set it outside tests. It is read here only, once per
process, and does nothing when unset (the engine and the runner ask ``engine_side`` and
``child_side``, which return None then).

Value: ``MODE:AT``. ``AT`` is a count N (the Nth event of the attempt, counting from 1), ``job``
or ``job+K`` (N is the job's id, plus K: the jobs of one submission each die at another instant)
or ``key=KEY`` / ``key=KEY@STEP`` (the first metric batch that carries the key KEY, at STEP).
Modes:

- ``engine-received``: the engine dies when it has received the Nth event of the run, before it
  buffers it;
- ``engine-mid-flush``: the engine dies in the first store write after the Nth event that
  carries the run's events, after its rows are written and before the transaction commits (a
  ``commit`` listener on the store's SQLAlchemy engine, registered only here);
- ``engine-after-flush``: the engine dies right after that write committed;
- ``child-journaled``: the child dies after writing its Nth metric batch to the work
  directory's journal and before sending it to the engine;
- ``child-sent``: the child dies after sending its Nth event;
- ``both``: after sending its Nth event the child kills its parent (the engine, under the local
  executor) and then itself.

Only attempt 1 of a job crashes, so the retry finishes it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

ENV = "MESA_TUI_TEST_CRASH"
ENGINE_MODES = ("engine-received", "engine-mid-flush", "engine-after-flush")
CHILD_MODES = ("child-journaled", "child-sent", "both")


@dataclass(frozen=True)
class CrashPoint:
    mode: str
    count: int | None = None  # the Nth event
    per_job: bool = False  # N is the job id (plus offset)
    offset: int = 0
    key: str | None = None  # the first metric batch carrying this key
    step: int | None = None  # (at this step)

    def hits(self, index: int, job_id: int, event: dict[str, Any]) -> bool:
        """Whether the ``index``-th event (from 1) of job ``job_id``'s run is the instant."""
        if self.key is not None:
            return event.get("t") == "metrics" and any(
                p[0] == self.key and (self.step is None or p[1] == self.step)
                for p in event.get("points") or ()
            )
        return index == (job_id + self.offset if self.per_job else self.count)


def parse(value: str) -> CrashPoint:
    mode, sep, at = value.strip().partition(":")
    if mode not in ENGINE_MODES + CHILD_MODES or not sep or not at:
        raise ValueError(
            f"{ENV}={value!r}: use MODE:N, MODE:job, MODE:job+K or MODE:key=KEY[@STEP] with MODE "
            "one of " + ", ".join(ENGINE_MODES + CHILD_MODES)
        )
    if at == "job" or (at.startswith("job+") and at[4:].isdigit()):
        return CrashPoint(mode, per_job=True, offset=int(at[4:] or 0))
    if at.startswith("key="):
        key, sep, step = at[4:].rpartition("@")
        if sep and step.isdigit() and key:
            return CrashPoint(mode, key=key, step=int(step))
        return CrashPoint(mode, key=at[4:])
    if not at.isdigit() or int(at) < 1:
        raise ValueError(f"{ENV}={value!r}: N must be a count from 1")
    return CrashPoint(mode, count=int(at))


@functools.cache
def configured() -> CrashPoint | None:
    """The crash point of this process's environment (parsed once), or None."""
    value = os.environ.get(ENV, "").strip()
    return parse(value) if value else None


def die(pid: int | None = None) -> None:
    os.kill(os.getpid() if pid is None else pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------------
# The engine's side


class EngineCrash:
    """Counts the events of first attempts and kills the engine at the configured instant."""

    def __init__(self, point: CrashPoint, store_engine: Any):
        self.point = point
        self.counts: dict[int, int] = {}
        self.armed: set[int] = set()  # runs whose instant came: the next write that holds them
        self.in_armed_write = False
        if point.mode == "engine-mid-flush":
            from sqlalchemy import event

            event.listen(store_engine, "commit", self._before_commit)

    def received(self, launch: Any, event: dict[str, Any]) -> None:
        """Called for every event before the engine buffers it."""
        if launch.attempt != 1 or launch.run_id in self.armed:
            return
        index = self.counts[launch.run_id] = self.counts.get(launch.run_id, 0) + 1
        if self.point.hits(index, launch.job_id, event):
            if self.point.mode == "engine-received":
                die()
            self.armed.add(launch.run_id)

    @contextlib.contextmanager
    def writing(self, run_ids: Sequence[int]) -> Iterator[None]:
        """Around every store write of buffered events."""
        hit = bool(self.armed.intersection(run_ids))
        self.in_armed_write = hit
        try:
            yield
        finally:
            self.in_armed_write = False
        if hit and self.point.mode == "engine-after-flush":
            die()

    def _before_commit(self, _conn: Any) -> None:
        if self.in_armed_write:
            die()


def engine_side(store_engine: Any) -> EngineCrash | None:
    point = configured()
    if point is None or point.mode not in ENGINE_MODES:
        return None
    return EngineCrash(point, store_engine)


# ------------------------------------------------------------------------------------------------
# The child's side


class ChildCrash:
    """Counts what the child of a first attempt journals and sends, and kills at the instant."""

    def __init__(self, point: CrashPoint, job_id: int):
        self.point = point
        self.job_id = job_id
        self.batches = 0

    def journaled(self, points: list[Any]) -> None:
        """After a metric batch is in the journal, before it is sent."""
        if self.point.mode != "child-journaled":
            return
        self.batches += 1
        if self.point.hits(self.batches, self.job_id, {"t": "metrics", "points": points}):
            die()

    def sent(self, index: int, event: dict[str, Any]) -> None:
        """After the ``index``-th event was written to the engine."""
        if self.point.mode not in ("child-sent", "both"):
            return
        if self.point.hits(index, self.job_id, event):
            if self.point.mode == "both":
                # The send succeeded, so the engine reading the pipe is alive and is our parent
                # (local executor); under Ray the parent is the worker that runs this child.
                die(os.getppid())
            die()


def child_side(launch: dict[str, Any]) -> ChildCrash | None:
    point = configured()
    if point is None or point.mode not in CHILD_MODES or launch.get("attempt") != 1:
        return None
    return ChildCrash(point, int(launch["job_id"]))
