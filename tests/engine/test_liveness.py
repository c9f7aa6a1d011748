"""Liveness that survives pid reuse: a stored pid counts as our engine (or our run's child) only
when that process started before the row naming it was written (psutil's create time against the
row's timestamp), not because its command line contains "engine"."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from sqlalchemy import update
from typer.testing import CliRunner

from engine.daemon import Engine, EngineConfig
from engine.executors.local import (
    LAUNCH_WINDOW_S,
    _cmdline,
    engine_process_alive,
    is_runner_process,
    process_started_at,
)
from store.entities import NewJob
from store.repository import Store, engines_t, runs_t, utcnow
from tests.engine.helpers import pid_alive

HOUR = timedelta(hours=1)


@pytest.fixture
def impostors():
    """Live processes whose command lines look like an engine and a runner (as a reused pid's
    process might), started now."""
    started = []

    def spawn(word: str) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(120)", word],
            stdin=subprocess.DEVNULL,
        )
        started.append(process)
        deadline = time.monotonic() + 10
        while word.encode() not in _cmdline(process.pid) and time.monotonic() < deadline:
            time.sleep(0.01)  # until it has exec'd its own command line
        return process

    yield spawn
    for process in started:
        process.kill()
        process.wait()


def test_start_times_tell_our_process_from_a_reused_pid(impostors):
    me = os.getpid()
    assert engine_process_alive(me, utcnow())  # started before it registered: ours
    assert not engine_process_alive(me, utcnow() - HOUR)  # the row predates us: a reused pid
    runner = impostors("engine.runner")
    now = utcnow()
    assert is_runner_process(runner.pid, now)  # launched right after its run row
    assert not is_runner_process(runner.pid, now - HOUR)  # a run that began an hour ago
    assert not is_runner_process(runner.pid, now + timedelta(seconds=LAUNCH_WINDOW_S + 60))
    assert not is_runner_process(me, utcnow())  # the right age, but not a runner
    runner.kill()
    runner.wait()
    assert process_started_at(runner.pid) is None and not is_runner_process(runner.pid, now)


def test_a_dead_engine_whose_pid_was_reused_is_seen_dead_and_its_run_retried(impostors):
    store = Store()
    host = socket.gethostname()
    reused = impostors("engine.daemon")  # the dead engine's pid, now another process
    child = impostors("engine.runner")  # its run's child pid, now another process too
    dead = store.register_engine(host, reused.pid, "old", 1)
    (job,) = store.submit([NewJob("count", {"steps": 3}, "h", max_attempts=3)])
    (claimed,) = store.claim_jobs(
        dead.id, 1, host=host, executor="local", code_version="old",
        workdir_for=lambda kind, i: f"/tmp/{kind}-{i}", startup_grace_s=600,
    )  # fmt: skip
    store.set_run_process(claimed.run_id, str(child.pid), None)
    an_hour_ago = utcnow() - HOUR
    with store.engine.begin() as conn:  # the engine registered, and its run began, an hour ago
        conn.execute(update(engines_t).values(started_at=an_hour_ago))
        conn.execute(update(runs_t).values(started_at=an_hour_ago))
    # Its heartbeat is fresh and its run's check-in is not due: only the pid can tell.
    Engine(EngineConfig(cpu_slots=1), store=store).sweep()
    (row,) = store.engines()
    assert row.stopped_at is not None
    (run,) = store.runs(job)
    assert run.status == "lost" and store.job(job).status == "queued"
    assert pid_alive(reused.pid) and pid_alive(child.pid)  # neither impostor was killed
    store.close()


def test_a_live_engine_is_kept(impostors):
    store = Store()
    alive = impostors("engine.daemon")
    store.register_engine(socket.gethostname(), alive.pid, "now", 1)  # registered after start
    Engine(EngineConfig(cpu_slots=1), store=store).sweep()
    (row,) = store.engines()
    assert row.stopped_at is None
    store.close()


def test_engine_stop_does_not_signal_a_reused_pid(impostors):
    from mesa_tui.cli import app

    store = Store()
    reused = impostors("engine.daemon")
    store.register_engine(socket.gethostname(), reused.pid, "old", 1)
    with store.engine.begin() as conn:
        conn.execute(update(engines_t).values(started_at=utcnow() - HOUR))
    result = CliRunner().invoke(app, ["engine", "stop", "--no-wait"])
    assert result.exit_code == 0, result.output
    time.sleep(0.3)
    assert reused.poll() is None  # still running: it was never sent SIGTERM
    store.close()
