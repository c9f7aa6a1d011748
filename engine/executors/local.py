"""Local executor: one child process per run, in its own process group, GPU pinned through
``CUDA_VISIBLE_DEVICES``; events come through a pipe, output goes to the run's log file."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from engine.executors.base import Executor, Handle, Launch, Slot
from engine.run_environment import THREADS_ENV


class LocalExecutor(Executor):
    name = "local"

    def __init__(self, log_dir: Path, python: str | None = None):
        self.log_dir = Path(log_dir)
        self.python = python or sys.executable

    def launch(self, launch: Launch, slot: Slot) -> Handle:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"run-{launch.run_id}.log"
        read_fd, write_fd = os.pipe()
        env = dict(os.environ)
        # A CPU slot hides every GPU, so a task on "auto" cannot wander onto a busy device.
        env["CUDA_VISIBLE_DEVICES"] = slot.gpu if slot.gpu is not None else ""
        env["PYTHONUNBUFFERED"] = "1"
        if slot.threads and THREADS_ENV not in os.environ:  # a value the user set wins
            env[THREADS_ENV] = str(slot.threads)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                [self.python, "-m", "engine.runner", "--events-fd", str(write_fd)],
                stdin=subprocess.PIPE,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                pass_fds=(write_fd,),
                start_new_session=True,
                env=env,
                close_fds=True,
            )
        os.close(write_fd)
        assert process.stdin is not None
        process.stdin.write((json.dumps(launch.to_json()) + "\n").encode())
        process.stdin.flush()
        queue: collections.deque[dict[str, Any]] = collections.deque()
        # Reading (and parsing) in a thread lets the child keep writing while the engine writes
        # the store: the two overlap instead of taking turns through a 64 KiB pipe.
        reader = threading.Thread(
            target=_read_events, args=(read_fd, queue), name=f"events-{launch.run_id}", daemon=True
        )
        reader.start()
        return Handle(
            launch=launch,
            slot=slot,
            external_id=str(process.pid),
            state={"process": process, "queue": queue, "reader": reader, "log": str(log_path)},
        )

    def events(self, handle: Handle) -> list[dict[str, Any]]:
        queue = handle.state["queue"]
        out = []
        while queue:
            out.append(queue.popleft())
        return out

    def poll(self, handle: Handle) -> int | None:
        code = handle.state["process"].poll()
        if code is None or handle.state["reader"].is_alive() or handle.state["queue"]:
            return None
        return code

    def cancel(self, handle: Handle, stage: str) -> None:
        process: subprocess.Popen = handle.state["process"]
        if stage == "stop":
            try:
                assert process.stdin is not None
                process.stdin.write(b"stop\n")
                process.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                pass
            return
        sig = signal.SIGTERM if stage == "term" else signal.SIGKILL
        kill_group(process.pid, sig)

    def close(self, handle: Handle) -> None:
        process: subprocess.Popen = handle.state["process"]
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()


def _read_events(fd: int, queue: collections.deque) -> None:
    """Parse JSON lines from the child until it closes the pipe."""
    with os.fdopen(fd, "rb", buffering=1 << 20) as pipe:
        for line in pipe:
            if not line.strip():
                continue
            try:
                queue.append(json.loads(line))
            except json.JSONDecodeError:
                queue.append(
                    {"t": "log", "level": "warning", "msg": line.decode(errors="replace").strip()}
                )


def kill_group(pid: int, sig: int) -> None:
    """Signal the child's whole process group (its own workers included)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------------------
# Is the process behind a stored pid still the one that was stored? A pid is reused once its
# process is gone, so its start time decides: a process that started after the row naming it
# was written is another process. The store's timestamps are compared with psutil's create time
# (no schema change: the rows already carry when they were written).

# psutil's create time is the boot time (whole seconds) plus the start in clock ticks, and the
# row's time is the wall clock of the same host: they agree within this.
START_TOLERANCE_S = 2.0
# A run's child is launched right after its run row is written (the claim): within this long.
LAUNCH_WINDOW_S = 120.0


def process_started_at(pid: int) -> float | None:
    """When the live process ``pid`` started (epoch seconds); None when there is none (or only
    a zombie). psutil where installed (every platform), else Linux's /proc."""
    try:
        import psutil
    except ImportError:
        return _proc_started_at(pid)
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return _proc_started_at(pid)


def _proc_started_at(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    if fields[0] == "Z":
        return None
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _epoch(when: Any) -> float:
    return when.timestamp() if hasattr(when, "timestamp") else float(when)


def started_before(pid: int, written_at: Any) -> bool:
    """True when ``pid`` is alive and started before a row written at ``written_at`` named it:
    the engine that registered, the foreground run that opened its run (a reused pid started
    after that process died, so after the row)."""
    started = process_started_at(pid)
    return started is not None and started <= _epoch(written_at) + START_TOLERANCE_S


def engine_process_alive(pid: int, registered_at: Any) -> bool:
    """The engine that registered at ``registered_at`` with ``pid`` still runs (on this host)."""
    return started_before(pid, registered_at)


def is_runner_process(pid: int, run_started_at: Any = None) -> bool:
    """True when ``pid`` is a live ``engine.runner`` child, and (given the run's ``started_at``)
    the one launched for that run: started within the launch window after the run row."""
    started = process_started_at(pid)
    if started is None:
        return False
    if run_started_at is not None:
        at = _epoch(run_started_at)
        if not at - START_TOLERANCE_S <= started <= at + LAUNCH_WINDOW_S:
            return False
    return b"engine.runner" in _cmdline(pid)


def _cmdline(pid: int) -> bytes:
    try:
        import psutil

        return "\0".join(psutil.Process(pid).cmdline()).encode()
    except ImportError:
        pass
    except Exception:
        return b""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
