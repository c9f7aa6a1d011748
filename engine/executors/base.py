"""The executor interface the engine drives: launch, poll, cancel, events.

An executor starts one child per run somewhere (a local process, a Ray task) and hands back the
child's events; the engine stays the only writer of the store.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Slot:
    """A place one run can use: a GPU (``gpu`` = its index as CUDA sees it) or a CPU slot."""

    name: str
    gpu: str | None = None
    threads: int | None = None  # CPU threads a run here may use (None: every core)


@dataclass
class Launch:
    """What the child needs (sent as the first line of its stdin by the local executor)."""

    run_id: int
    job_id: int
    attempt: int
    kind: str
    spec: dict[str, Any]
    workdir: str
    resume: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "job_id": self.job_id,
            "attempt": self.attempt,
            "kind": self.kind,
            "spec": self.spec,
            "workdir": self.workdir,
            "resume": self.resume,
        }


@dataclass
class Handle:
    """A launched run. ``external_id`` is what the store records (a process id, a Ray task id)."""

    launch: Launch
    slot: Slot
    external_id: str
    state: dict[str, Any] = field(default_factory=dict)


class Executor(abc.ABC):
    name = "executor"

    @abc.abstractmethod
    def launch(self, launch: Launch, slot: Slot) -> Handle:
        """Start the run's child; return at once."""

    @abc.abstractmethod
    def poll(self, handle: Handle) -> int | None:
        """The child's exit code once it has ended and its events are drained, else None."""

    @abc.abstractmethod
    def events(self, handle: Handle) -> list[dict[str, Any]]:
        """Events received since the last call (never blocks)."""

    @abc.abstractmethod
    def cancel(self, handle: Handle, stage: str) -> None:
        """``stage``: "stop" (ask the task), "term" (SIGTERM) or "kill" (SIGKILL)."""

    def close(self, handle: Handle) -> None:  # noqa: B027  (optional hook)
        """Release what the executor holds for an ended run (pipes, task references)."""

    def slots(self, requested: int | None = None) -> list[Slot] | None:
        """The executor's own slots (a cluster's), or None to use the engine's CPU/GPU slots."""
        return None

    def shutdown(self) -> None:  # noqa: B027  (optional hook)
        """Release what the executor holds for the engine (a cluster connection)."""
