"""``engine start --detach``, ``status``, ``stop`` as a user runs them, with a fast test task."""

from __future__ import annotations

import json
import subprocess
import sys

from store.entities import NewJob
from store.repository import Store
from tests.engine.helpers import ROOT, engine_env, pid_alive, wait_for


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "mesa_tui.cli", *args],
        env=engine_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_engine_start_detach_status_metrics_logs_stop():
    started = json.loads(cli("engine", "start", "--detach", "--cpu-slots", "1", "--json").stdout)
    pid = started["engine"]["pid"]
    try:
        status = json.loads(cli("engine", "status", "--json").stdout)
        assert status["alive"] and status["engines"][0]["slots"] == 1
        store = Store()
        (job,) = store.submit([NewJob("count", {"steps": 8, "step_s": 0.02}, "h")])
        wait_for(lambda: store.job(job).status == "succeeded", timeout=30, what="the job")
        series = json.loads(cli("metrics", str(job), "--key", "count/k0", "--json").stdout)
        assert [p["step"] for p in series["points"]] == list(range(8))
        assert series["metrics"] == {"count/k0": 7.0}
        shown = json.loads(cli("show", str(job), "--json").stdout)
        assert shown["artifact"].endswith("out") and shown["metrics"]["count/final"] == 8.0
        run = shown["runs"][0]
        assert run["env"]["code_version"] and run["seed"] == 0 and run["spec_hash"] == "h"
    finally:
        stopped = json.loads(cli("engine", "stop", "--json").stdout)
    assert stopped["asked"] == stopped["stopped"] == [started["engine"]["id"]]
    wait_for(lambda: not pid_alive(pid), timeout=10, what="the engine to exit")
    assert json.loads(cli("engine", "status", "--json").stdout)["alive"] is False


def test_engine_start_refuses_a_bad_environment_value_before_it_starts(isolated_home, monkeypatch):
    """Every job would inherit the value and fail; the engine says so at once, in one line."""
    from typer.testing import CliRunner

    from mesa_tui.cli import app
    from tests.cli.test_run_cli import assert_one_line_error, files_under

    monkeypatch.setenv("MESA_TUI_MALLOC", "tcmalloc")
    result = CliRunner().invoke(app, ["engine", "start", "--detach"])
    assert_one_line_error(result, "MESA_TUI_MALLOC='tcmalloc'", "keep or system")
    assert files_under(isolated_home) == []  # no store, no log, no engine
