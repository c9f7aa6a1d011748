"""The engine process: sweep stale runs, honour cancels, claim jobs, launch children, drain events.

One loop, one thread. The engine is the only writer of runs, metrics and heartbeats: children
stream events through pipes and the engine writes them in batches, one short transaction each.
It never imports torch: GPU figures come from NVML when the ``pynvml`` module is present.

Run it with ``mesa-tui engine start`` (or ``python -m engine.daemon``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from engine import paths
from engine.executors.base import Executor, Handle, Launch, Slot
from engine.executors.local import (
    LocalExecutor,
    engine_process_alive,
    is_runner_process,
    kill_group,
    started_before,
)
from engine.run_environment import usable_cores
from engine.spec_fields import option_name
from engine.version import code_version

log = logging.getLogger("mesa.engine")
# How long the sweep waits for an orphaned child it killed to be gone (a zombie counts as gone).
ORPHAN_EXIT_WAIT_S = 5.0


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass
class EngineConfig:
    """Slots and timings. The check-in and grace figures can be shortened through the
    environment (``MESA_TUI_STARTUP_GRACE_S``, ``MESA_TUI_CANCEL_GRACE_S``, ``MESA_TUI_CHECKIN_SLACK_S``)
    for tests, and the interval of the buffered writes lengthened (``MESA_TUI_FLUSH_EVERY_S``: a
    test that must kill the engine while it still holds a batch, as on a fast CPU)."""

    cpu_slots: int | None = None
    gpus: list[str] | None = None
    slots_per_gpu: int = 1
    log_path: str | None = None
    tick_s: float = 0.02
    claim_every_s: float = 0.2
    heartbeat_every_s: float = 2.0
    sweep_every_s: float = 5.0
    cancel_check_every_s: float = 0.5
    flush_every_s: float = field(default_factory=lambda: _env_float("MESA_TUI_FLUSH_EVERY_S", 0.2))
    startup_grace_s: float = field(
        default_factory=lambda: _env_float("MESA_TUI_STARTUP_GRACE_S", 300)
    )
    cancel_grace_s: float = field(
        default_factory=lambda: _env_float("MESA_TUI_CANCEL_GRACE_S", 3.0)
    )
    checkin_slack_s: float = field(
        default_factory=lambda: _env_float("MESA_TUI_CHECKIN_SLACK_S", 10.0)
    )
    executor: str = "local"
    ray_address: str = "auto"
    ray_gpus: float = 1.0
    ray_artifacts: str = "auto"


EXECUTORS = ("local", "ray")


def make_executor(config: EngineConfig) -> Executor:
    """The executor ``config.executor`` names (ray is imported only when asked for)."""
    if config.executor == "local":
        return LocalExecutor(paths.data_home() / "logs")
    if config.executor == "ray":
        from engine.executors.ray import RayExecutor

        return RayExecutor(
            config.ray_address,
            paths.data_home() / "logs",
            gpus_per_run=config.ray_gpus,
            artifacts=config.ray_artifacts,
        )
    from engine.errors import UserError

    raise UserError(f"unknown --executor '{config.executor}'; use {' or '.join(EXECUTORS)}")


# ------------------------------------------------------------------------------------------------
# GPUs without torch


def _nvml() -> Any | None:
    try:
        import pynvml  # optional: nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    return pynvml


def visible_gpus() -> list[str]:
    """GPU indices this engine may use: ``CUDA_VISIBLE_DEVICES`` if set, else NVML's count."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    nvml = _nvml()
    if nvml is None:
        return []
    try:
        return [str(i) for i in range(nvml.nvmlDeviceGetCount())]
    except Exception:
        return []


def gpu_snapshot(gpus: list[str]) -> list[dict[str, Any]]:
    """Name, memory and utilisation of each GPU through NVML (only the index without NVML)."""
    nvml = _nvml() if gpus else None
    out: list[dict[str, Any]] = []
    for gpu in gpus:
        entry: dict[str, Any] = {
            "index": int(gpu) if gpu.isdigit() else len(out),
            "name": f"gpu {gpu}",
        }
        if nvml is not None and gpu.isdigit():
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(int(gpu))
                name = nvml.nvmlDeviceGetName(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                util = nvml.nvmlDeviceGetUtilizationRates(handle)
                entry.update(
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    memory_used_mb=memory.used / 2**20,
                    memory_total_mb=memory.total / 2**20,
                    utilization_pct=float(util.gpu),
                )
            except Exception:
                pass
        out.append(entry)
    return out


def make_slots(config: EngineConfig) -> list[Slot]:
    """One slot per GPU (times ``slots_per_gpu``); CPU slots when no GPU is given or found."""
    gpus = config.gpus if config.gpus is not None else ([] if config.cpu_slots else visible_gpus())
    slots = [
        Slot(name=f"gpu{g}" + (f".{k}" if config.slots_per_gpu > 1 else ""), gpu=g)
        for g in gpus
        for k in range(config.slots_per_gpu)
    ]
    if not gpus:
        slots = [Slot(name=f"cpu{k}") for k in range(max(1, config.cpu_slots or 1))]
    # The cores are shared out among the slots, so runs side by side do not oversubscribe them.
    threads = max(1, usable_cores() // len(slots))
    return [dataclasses.replace(slot, threads=threads) for slot in slots]


def workdir_for(kind: str, job_id: int) -> Path:
    """A job's work directory, the same for every attempt (checkpoints survive a retry)."""
    return paths.artifacts_dir() / f"{kind}-{job_id}"


# ------------------------------------------------------------------------------------------------


@dataclass
class ActiveRun:
    handle: Handle
    events: Any
    promise_s: float
    deadline: float
    launched: float
    final: dict[str, Any] | None = None
    cancel_stage: str | None = None
    cancel_since: float = 0.0
    shutdown: bool = False
    first_event_at: float | None = None


class Engine:
    """One engine process bound to one store."""

    def __init__(self, config: EngineConfig, store: Any = None, executor: Executor | None = None):
        from store.repository import Store

        self.config = config
        self.store = store or Store()
        self.executor = executor or make_executor(config)
        self.slots = self.executor.slots(config.cpu_slots) or make_slots(config)
        self.gpus = sorted({s.gpu for s in self.slots if s.gpu is not None})
        self.host = socket.gethostname()
        self.version = code_version()
        self.active: dict[int, ActiveRun] = {}
        self.stopping = False
        self.engine_id: int | None = None
        from engine.system import SystemSampler

        self.system = SystemSampler()
        self._last_problem: tuple[str | None, float] = (None, 0.0)
        from engine import crashpoints

        self.crash = crashpoints.engine_side(self.store.engine)  # tests only (MESA_TUI_TEST_CRASH)

    # -------------------------------------------------------------------------------- lifecycle

    @property
    def registered_id(self) -> int:
        """This engine's row; the loop's store calls come after ``run`` registered it."""
        assert self.engine_id is not None, "the engine registers before its loop starts"
        return self.engine_id

    def request_stop(self, *_: Any) -> None:
        self.stopping = True

    def run(self) -> None:
        from store.db import safe_url

        info = self.store.register_engine(
            self.host,
            os.getpid(),
            self.version,
            len(self.slots),
            gpu_snapshot(self.gpus),
            executor=self.executor.name,
            log_path=self.config.log_path,
        )
        self.engine_id = info.id
        log.info(
            "engine %d started on %s (pid %d): %d slot(s) %s; store %s",
            info.id,
            self.host,
            os.getpid(),
            len(self.slots),
            ", ".join(s.name for s in self.slots),
            safe_url(self.store.url),
        )
        self.sweep()
        due = {"heartbeat": 0.0, "sweep": time.monotonic() + self.config.sweep_every_s}
        due.update(claim=0.0, cancel=0.0, flush=0.0)
        try:
            while not (self.stopping and not self.active):
                try:
                    self.step(due)
                except Exception as exc:
                    # A store hiccup must not take the engine (and its children) down; a full
                    # disk or a server gone away is retried until it passes, buffers kept.
                    if not self.report_store_failure(exc, "engine step failed"):
                        log.exception("engine step failed; retrying in a second")
                    time.sleep(1.0)
        finally:
            self.flush()
            self.store.engine_stopped(self.engine_id)
            self.executor.shutdown()
            log.info("engine %d stopped", self.engine_id)

    def system_snapshot(self) -> dict[str, Any] | None:
        """The host and each slot's child (psutil), for the app's system pane."""
        by_slot = {run.handle.slot: run.handle for run in self.active.values()}
        slots = []
        for index, slot in enumerate(self.slots):
            handle = by_slot.get(slot)
            pid = handle.external_id if handle is not None else ""
            job_id = handle.launch.job_id if handle is not None else None
            slots.append((index, slot.gpu, job_id, int(pid) if pid.isdigit() else None))
        return self.system.snapshot(slots)

    def report_store_failure(self, exc: Exception, doing: str) -> bool:
        """Log a store problem (``store.health``: a full disk, a server gone away, damage) in
        its one line with the events held for the retry, at most once a minute while the same
        problem lasts (a full disk must not fill up with the log). False for any other error."""
        from store.health import classify

        url = getattr(self.store, "url", None)
        problem = classify(exc, url) if isinstance(url, str) else None
        if problem is None:
            return False
        now = time.monotonic()
        last = self._last_problem
        if str(problem) != last[0] or now - last[1] > 60:
            self._last_problem = (str(problem), now)
            held = sum(
                len(r.events.metrics) + len(r.events.logs) + len(r.events.artifacts)
                for r in self.active.values()
            )
            log.error("%s: %s; %d event(s) held, retrying", doing, problem, held)
        return True

    def step(self, due: dict[str, float]) -> None:
        """One turn of the loop: heartbeat, sweep, cancels, claims, events, exits, writes."""
        now = time.monotonic()
        if now >= due["heartbeat"]:
            due["heartbeat"] = now + self.config.heartbeat_every_s
            beat = self.store.engine_heartbeat(
                self.registered_id,
                len(self.active),
                gpu_snapshot(self.gpus),
                self.system_snapshot(),
            )
            if beat.stop_requested_at is not None and not self.stopping:
                log.info("stop requested through the store")
                self.stopping = True
        if now >= due["sweep"]:
            due["sweep"] = now + self.config.sweep_every_s
            self.sweep()
        if now >= due["cancel"]:
            due["cancel"] = now + self.config.cancel_check_every_s
            self.check_cancels()
        if self.stopping:
            self.begin_shutdown()
        self.advance_cancels(now)
        free = len(self.slots) - len(self.active)
        if not self.stopping and free > 0 and now >= due["claim"]:
            due["claim"] = now + self.config.claim_every_s
            self.claim_and_launch()
        self.drain_events()
        finished = self.collect_exits()
        self.check_deadlines()
        if finished or time.monotonic() >= due["flush"]:
            due["flush"] = time.monotonic() + self.config.flush_every_s
            self.flush()
        self.finalize(finished)
        time.sleep(self.config.tick_s)

    # -------------------------------------------------------------------------------- claiming

    def claim_and_launch(self) -> None:
        from store.repository import RunEvents

        busy = {run.handle.slot for run in self.active.values()}
        free_slots = [s for s in self.slots if s not in busy]
        claimed = self.store.claim_jobs(
            self.registered_id,
            len(free_slots),
            host=self.host,
            executor=self.executor.name,
            code_version=self.version,
            workdir_for=workdir_for,
            startup_grace_s=self.config.startup_grace_s,
        )
        for job, slot in zip(claimed, free_slots, strict=False):
            spec = dict(job.spec)
            try:
                inputs = self.resolve_inputs(job.inputs)
                spec.update(inputs)
                launch = Launch(
                    run_id=job.run_id,
                    job_id=job.job_id,
                    attempt=job.attempt,
                    kind=job.kind,
                    spec=spec,
                    workdir=job.workdir or str(workdir_for(job.kind, job.job_id)),
                    resume=job.resume,
                )
                handle = self.executor.launch(launch, slot)
            except Exception as exc:
                log.error("job %d could not start: %s", job.job_id, exc)
                self.store.finish_run(job.run_id, "failed", error=f"could not start: {exc}")
                continue
            self.store.set_run_process(job.run_id, handle.external_id, slot.gpu)
            now = time.monotonic()
            events = RunEvents(job.run_id, job.job_id)
            if inputs:
                events.logs.append(
                    (
                        "info",
                        "inputs: " + ", ".join(f"{k}={v}" for k, v in inputs.items()),
                        time.time(),
                    )
                )
            self.active[job.run_id] = ActiveRun(
                handle=handle,
                events=events,
                promise_s=self.config.startup_grace_s,
                deadline=now + self.config.startup_grace_s + self.config.checkin_slack_s,
                launched=now,
            )
            log.info(
                "job %d (%s) attempt %d started as run %d, %s %s on %s%s",
                job.job_id,
                job.kind,
                job.attempt,
                job.run_id,
                "ray task" if self.executor.name == "ray" else "pid",
                handle.external_id,
                slot.name,
                ", resuming" if job.resume else "",
            )

    def resolve_inputs(self, inputs: dict[str, int]) -> dict[str, Any]:
        """Spec values from upstream jobs: an artifact path, or the class a detect job flagged
        (input ``target:flagged``); one upstream job may feed several fields, comma-separated
        (``target:flagged,scan_from``: a search's target and the detection it reuses)."""
        values: dict[str, Any] = {}
        for input_fields, upstream in inputs.items():
            for input_field in input_fields.split(","):
                field, _, source = input_field.partition(":")
                values[field] = self._input_value(field, source, upstream)
        return values

    def _input_value(self, field: str, source: str, upstream: int) -> Any:
        from engine.pipelines import flagged_target

        if source == "flagged":
            target = flagged_target(self.store.job_detail(upstream).result)
            if target is None:
                raise RuntimeError(
                    f"detect job {upstream} flagged no class (the model looks clean); "
                    "submit with --target N to search a class anyway"
                )
            return target
        artifact = self.store.upstream_artifact(upstream)
        if artifact is None:
            raise RuntimeError(f"upstream job {upstream} left no artifact for {field}")
        return artifact.path

    # -------------------------------------------------------------------------------- events

    def drain_events(self) -> None:
        from store.repository import utcnow

        for run in self.active.values():
            events = self.executor.events(run.handle)
            if not events:
                continue
            buffer = run.events
            for event in events:
                if self.crash is not None:
                    self.crash.received(run.handle.launch, event)
                kind = event.get("t")
                if kind == "metrics":
                    # A resumed attempt's replay of the journal: written before its own points
                    # (the last write of a step wins) and never taken for its start step.
                    (buffer.replayed if event.get("replay") else buffer.metrics).extend(
                        (str(k), int(s), float(v), float(t)) for k, s, v, t in event["points"]
                    )
                elif kind == "checkin":
                    run.promise_s = float(event.get("within", run.promise_s))
                elif kind == "log":
                    buffer.logs.append(
                        (
                            str(event.get("level", "info")),
                            str(event.get("msg", "")),
                            float(event.get("time", time.time())),
                        )
                    )
                elif kind == "artifact":
                    buffer.artifacts.append(
                        (
                            event["path"],
                            event.get("kind", ""),
                            event.get("sha256"),
                            event.get("bytes"),
                        )
                    )
                elif kind == "progress":
                    buffer.progress = {
                        "stage": event.get("stage", ""),
                        "done": event.get("done", 0),
                        "total": event.get("total", 0),
                        "info": event.get("info", {}),
                        "wall_time": event.get("time", time.time()),
                        "started": event.get("started"),
                    }
                elif kind == "env":
                    buffer.env = dict(event.get("env") or {})
                elif kind == "started":
                    run.first_event_at = time.monotonic()
                    buffer.logs.append(
                        (
                            "debug",
                            f"child {event.get('pid')} started",
                            float(event.get("time", time.time())),
                        )
                    )
                elif kind == "status":
                    run.final = event
            now = time.monotonic()
            run.deadline = now + run.promise_s + self.config.checkin_slack_s
            buffer.expect_next_by = utcnow() + timedelta(
                seconds=run.promise_s + self.config.checkin_slack_s
            )

    def record(self, batches: list[Any]) -> None:
        """Write buffered events to the store (one transaction)."""
        if self.crash is None:
            self.store.record_events(batches)
            return
        with self.crash.writing([b.run_id for b in batches]):
            self.store.record_events(batches)

    def flush(self) -> None:
        batches = [run.events for run in self.active.values() if not run.events.empty()]
        if not batches:
            return
        try:
            self.record(batches)
        except Exception as exc:
            # Keep the buffers: the next flush writes them (nothing is lost or doubled).
            if not self.report_store_failure(exc, "could not write events"):
                log.warning("could not write events (will retry): %s", exc)
            return
        for batch in batches:
            batch.clear()

    # -------------------------------------------------------------------------------- endings

    def collect_exits(self) -> list[tuple[int, int]]:
        finished = []
        for run_id, run in self.active.items():
            code = self.executor.poll(run.handle)
            if code is not None:
                finished.append((run_id, code))
        return finished

    def finalize(self, finished: list[tuple[int, int]]) -> None:
        for run_id, code in finished:
            # The run stays active until its ending is stored: a write that fails (a full disk)
            # raises, and the next turn finds the same exit and writes it again.
            run = self.active[run_id]
            if not run.events.empty():
                self.record([run.events])
                run.events.clear()
            final = run.final or {}
            status = final.get("status")
            job_id = run.handle.launch.job_id
            if run.shutdown:
                if status == "succeeded":
                    self.store.finish_run(
                        run_id, "succeeded", exit_code=code, result=final.get("result")
                    )
                else:
                    self.store.mark_lost([run_id], "engine stopped", refund=True)
                    log.info("job %d requeued: its engine stopped", job_id)
                self._ended(run_id)
                continue
            if status in ("succeeded", "failed", "cancelled"):
                if run.cancel_stage and status != "succeeded":
                    status = "cancelled"
                self.store.finish_run(
                    run_id,
                    status,
                    exit_code=code,
                    error=final.get("error"),
                    result=final.get("result"),
                )
            elif run.cancel_stage:
                self.store.finish_run(
                    run_id, "cancelled", exit_code=code, error="cancelled by request"
                )
                status = "cancelled"
            elif code < 0:
                reason = run.handle.state.get("lost_reason") or f"child killed by signal {-code}"
                self.store.mark_lost([run_id], reason)
                status = "lost"
            else:
                tail = _tail(run.handle.state.get("log"))
                self.store.finish_run(
                    run_id,
                    "failed",
                    exit_code=code,
                    error=f"child exited with code {code} without a result; {tail}",
                )
                status = "failed"
            self._ended(run_id)
            log.info("job %d run %d ended: %s (exit %s)", job_id, run_id, status, code)

    def _ended(self, run_id: int) -> None:
        self.executor.close(self.active.pop(run_id).handle)

    def check_deadlines(self) -> None:
        now = time.monotonic()
        for run_id, run in list(self.active.items()):
            if run.final is None and run.cancel_stage is None and now > run.deadline:
                silent = now - (run.deadline - run.promise_s - self.config.checkin_slack_s)
                reason = f"missed its check-in (silent for {silent:.0f} s)"
                log.warning("run %d %s: killing it", run_id, reason)
                self.executor.cancel(run.handle, "kill")
                self.flush()
                self.store.mark_lost([run_id], reason)
                self.active.pop(run_id)
                self.executor.close(run.handle)

    # -------------------------------------------------------------------------------- cancel

    def check_cancels(self) -> None:
        for _job_id, run_id in self.store.cancel_requests(self.registered_id):
            run = self.active.get(run_id)
            if run is not None and run.cancel_stage is None:
                log.info("cancelling job %d (run %d)", run.handle.launch.job_id, run_id)
                self._cancel(run, "stop")

    def begin_shutdown(self) -> None:
        for run in self.active.values():
            if not run.shutdown:
                run.shutdown = True
                if run.cancel_stage is None:
                    self._cancel(run, "stop")

    def _cancel(self, run: ActiveRun, stage: str) -> None:
        run.cancel_stage = stage
        run.cancel_since = time.monotonic()
        self.executor.cancel(run.handle, stage)

    def advance_cancels(self, now: float) -> None:
        """Cooperative stop first; SIGTERM, then SIGKILL to the group after the grace period."""
        grace = self.config.cancel_grace_s
        for run in self.active.values():
            if run.cancel_stage == "stop" and now - run.cancel_since > grace:
                self._cancel(run, "term")
            elif run.cancel_stage == "term" and now - run.cancel_since > grace:
                self._cancel(run, "kill")

    # -------------------------------------------------------------------------------- faults

    def sweep(self) -> None:
        """Runs that stopped reporting or whose engine died become lost (and are retried).

        A dead engine on this host is recognised at once by its pid and that process's start
        time (a reused pid started after the engine registered); elsewhere by a stale
        heartbeat. An orphaned child still alive here is killed first, so two attempts never
        share a work directory.
        """
        for run in self.store.running_runs():
            # A foreground `mesa-tui run` that died (kill -9, power) cannot close its own run.
            if (
                run.executor == "foreground"
                and run.host == self.host
                and (pid_text := run.external_id or "").isdigit()
                and not started_before(int(pid_text), run.started_at)
            ):
                self.store.finish_run(
                    run.id, "failed", error="the foreground process ended without closing its run"
                )
        from store.repository import utcnow

        dead_here: list[int] = []
        alive_here: list[int] = []
        for engine in self.store.engines():
            if engine.id == self.engine_id or engine.stopped_at is not None:
                continue
            if engine.host == self.host:
                alive = engine_process_alive(engine.pid, engine.started_at)  # not a reused pid
                (alive_here if alive else dead_here).append(engine.id)
        for engine_id in dead_here:
            self.store.engine_stopped(engine_id)
        now = utcnow()
        # A live engine here with a late heartbeat is busy, not dead: only its runs' own
        # check-in deadlines apply to it.
        stale = [
            r
            for r in self.store.stale_runs(now=now, dead_engine_ids=dead_here)
            if r.id not in self.active
            and not (
                r.engine_id in alive_here
                and r.expect_next_by is not None
                and r.expect_next_by > now
            )
        ]
        if not stale:
            return
        killed = []
        for run in stale:
            local = run.executor in ("local", None)
            if local and run.host == self.host and (pid_text := run.external_id or "").isdigit():
                pid = int(pid_text)
                if is_runner_process(pid, run.started_at):  # this run's child, not a reused pid
                    kill_group(pid, signal.SIGKILL)
                    killed.append(pid)
        # SIGKILL is delivered asynchronously: the retry must not open the work directory (its
        # checkpoints, the metric journal) while the old child can still write there.
        deadline = time.monotonic() + ORPHAN_EXIT_WAIT_S
        while killed and time.monotonic() < deadline:
            killed = [pid for pid in killed if is_runner_process(pid)]
            if killed:
                time.sleep(0.01)
        reasons = {
            r.id: "its engine died" if r.engine_id in dead_here else "missed its check-in"
            for r in stale
        }
        for reason in set(reasons.values()):
            ids = [run_id for run_id, why in reasons.items() if why == reason]
            for job in self.store.mark_lost(ids, reason):
                log.warning("job %d: run lost (%s); now %s", job.id, reason, job.status)


def _tail(path: str | None, lines: int = 3) -> str:
    if not path or not Path(path).exists():
        return "no output"
    text = Path(path).read_text(errors="replace").strip().splitlines()[-lines:]
    return " | ".join(text) if text else f"no output (log {path})"


def configure_logging(log_path: str | None = None) -> None:
    handler: logging.Handler = (
        logging.FileHandler(log_path) if log_path else logging.StreamHandler()
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("mesa")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def serve(config: EngineConfig, check_store: bool = True) -> None:
    """Run an engine until SIGTERM/SIGINT or a stop request; stops its children cleanly.

    A store that fails ``PRAGMA integrity_check`` is refused first (``CorruptStore``), unless
    the caller has just checked it (``mesa-tui engine start`` checks before it detaches)."""
    from store.health import check_integrity
    from store.repository import Store

    store = Store()
    if check_store:
        check_integrity(store.engine, store.url)
    configure_logging(config.log_path)
    engine = Engine(config, store=store)
    signal.signal(signal.SIGTERM, engine.request_stop)
    signal.signal(signal.SIGINT, engine.request_stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    engine.run()


def parse_gpus(value: str | None) -> list[str] | None:
    if value is None:
        return None
    gpus = [g.strip() for g in value.split(",") if g.strip()]
    for g in gpus:
        if not (g.isascii() and g.isdigit()):
            from engine.errors import UserError

            raise UserError(f"invalid --gpus {value!r}: give GPU indices like 0,1")
    return gpus


class EngineFlags(BaseModel):
    """How the engine runs jobs: CPU or GPU slots, its log and the executor.

    The flags of ``mesa-tui engine start`` and ``python -m engine.daemon``, defined once: the
    CLI makes its options of these fields and hands a detached engine the ones given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu_slots: int | None = Field(
        None,
        ge=1,
        description="run N jobs at once on the CPU (no GPU); each gets its share of the cores",
    )
    gpus: str | None = Field(
        None, description="GPU indices to use, e.g. 0,1 (default: every visible GPU)"
    )
    slots_per_gpu: int = Field(1, ge=1, description="jobs per GPU at once (small jobs)")
    log: str | None = Field(None, description="log file (default with --detach: in the data home)")
    executor: str | None = Field(
        None,
        description="local (child processes here, the default) or ray (tasks on a Ray cluster)",
    )
    ray_address: str | None = Field(
        None,
        description="Ray head HOST:PORT, auto (RAY_ADDRESS or a cluster on this machine) or "
        "local (start a Ray instance here); implies --executor ray",
    )
    ray_gpus: float = Field(
        1.0, description="GPUs a run asks Ray for (runs with --device cpu ask for none)"
    )
    ray_artifacts: str = Field(
        "auto",
        description="shared (every node sees the data home), copy (through Ray's object store) "
        "or auto",
    )

    def config(self) -> EngineConfig:
        """Checked into the engine's configuration (one line naming a bad value and the fix)."""
        return EngineConfig(
            cpu_slots=self.cpu_slots,
            gpus=parse_gpus(self.gpus),
            slots_per_gpu=self.slots_per_gpu,
            log_path=self.log,
            **executor_options(self.executor, self.ray_address, self.ray_gpus, self.ray_artifacts),
        )

    def argv(self) -> list[str]:
        """The flags given (the others keep their defaults), as ``main`` reads them."""
        out = []
        for name, value in self.model_dump(exclude_unset=True).items():
            if value is not None:
                out += [option_name(name), str(value)]
        return out


def flag_parser() -> argparse.ArgumentParser:
    """``python -m engine.daemon``'s parser: ``EngineFlags``' fields, each as text that the
    model checks, and ``--store-checked``."""
    parser = argparse.ArgumentParser(prog="python -m engine.daemon")
    for name, info in EngineFlags.model_fields.items():
        parser.add_argument(option_name(name), dest=name, help=info.description)
    # `mesa-tui engine start` has checked the store's integrity before it started this process.
    parser.add_argument("--store-checked", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(flag_parser().parse_args(argv))
    store_checked = args.pop("store_checked")
    from engine.errors import UserError

    try:
        flags = build_flags({k: v for k, v in args.items() if v is not None})
        serve(flags.config(), check_store=not store_checked)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from store.health import classify

        problem = classify(exc, paths.default_db_url())
        if problem is None:
            raise
        print(f"error: {problem}", file=sys.stderr)
        return 2
    return 0


def build_flags(values: dict[str, Any]) -> EngineFlags:
    """``EngineFlags`` from given values; a bad one is one line (``UserError``)."""
    from pydantic import ValidationError

    from engine.errors import UserError

    try:
        return EngineFlags(**values)
    except ValidationError as exc:
        from engine.specs import format_validation_error

        raise UserError(format_validation_error(exc, EngineFlags)) from None


def executor_options(
    executor: str | None, ray_address: str | None, ray_gpus: float, ray_artifacts: str
) -> dict[str, Any]:
    """Check the executor flags (one line naming the bad value and the fix) into config fields.
    ``--ray-address`` alone means ``--executor ray``; ray's default address is ``RAY_ADDRESS``
    or ``auto`` (a cluster started on this machine with ``ray start --head``)."""
    from engine.errors import UserError

    executor = executor or ("ray" if ray_address else "local")
    if executor not in EXECUTORS:
        raise UserError(f"unknown --executor '{executor}'; use {' or '.join(EXECUTORS)}")
    if executor != "ray":
        if ray_address:
            raise UserError("--ray-address needs --executor ray")
        return {"executor": executor}
    if ray_artifacts not in ("auto", "shared", "copy"):
        raise UserError(f"--ray-artifacts '{ray_artifacts}' is unknown; use auto, shared or copy")
    if ray_gpus < 0:
        raise UserError(f"--ray-gpus {ray_gpus} is negative; give the GPUs per run, e.g. 1")
    from engine.executors.ray import check_address, import_ray

    import_ray()
    address = ray_address or os.environ.get("RAY_ADDRESS") or "auto"
    check_address(address)
    return {
        "executor": "ray",
        "ray_address": address,
        "ray_gpus": ray_gpus,
        "ray_artifacts": ray_artifacts,
    }


if __name__ == "__main__":
    raise SystemExit(main())
