"""Starting real engine processes against the test's store, and waiting on job states."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from store.repository import Store

ROOT = Path(__file__).resolve().parents[2]
FINISHED = {"succeeded", "failed", "cancelled", "lost"}


def engine_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["MESA_TUI_TASK_MODULES"] = "count=tests.engine.counting_task"
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def start_engine(tmp_path: Path, name: str = "engine", slots: int = 1, **extra: str):
    log = open(tmp_path / f"{name}.log", "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "engine.daemon", "--cpu-slots", str(slots)],
        env=engine_env(**extra),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    store = Store()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if any(e.pid == process.pid and e.alive for e in store.engines()):
            return process
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError((tmp_path / f"{name}.log").read_text())


def stop_engine(process: subprocess.Popen, timeout: float = 20) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for(predicate, timeout: float = 30, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
