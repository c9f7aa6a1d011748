"""Shared helpers of the store and engine benchmarks: an isolated home, a real engine process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def isolated_home(prefix: str) -> Path:
    """A fresh MESA_TUI_HOME (store, artifacts, logs) for this benchmark run."""
    home = Path(tempfile.mkdtemp(prefix=f"mesa-bench-{prefix}-"))
    os.environ["MESA_TUI_HOME"] = str(home)
    os.environ.pop("MESA_TUI_DB", None)
    os.environ.pop("MESA_DB", None)  # the old name would still be read
    # The fast test-only task kind "count" (tests/engine/counting_task.py) drives the engine.
    os.environ["MESA_TUI_TASK_MODULES"] = "count=tests.engine.counting_task"
    os.environ["PYTHONPATH"] = str(ROOT)
    return home


def start_engine(slots: int = 1) -> subprocess.Popen:
    from store.repository import Store

    log = open(Path(os.environ["MESA_TUI_HOME"]) / "engine.log", "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "engine.daemon", "--cpu-slots", str(slots)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    store = Store()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(e.pid == process.pid and e.alive for e in store.engines()):
            return process
        time.sleep(0.05)
    raise SystemExit("the engine did not start; see engine.log in the benchmark home")


def stop_engine(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


def machine() -> dict[str, object]:
    """What the figures were measured on, with the load (other work skews them)."""
    import platform

    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
