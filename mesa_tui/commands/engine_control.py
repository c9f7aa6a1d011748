"""``mesa-tui engine start|stop|status``: the background process that runs queued jobs."""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import typer

from mesa_tui.commands.common import cli_errors, print_json
from mesa_tui.commands.model_options import Given, field_parameters, model_command

app = typer.Typer(
    help="Start, stop and inspect the engine that runs queued jobs.", no_args_is_help=True
)


def _engine_flags() -> list[inspect.Parameter]:
    from engine.daemon import EngineFlags

    return field_parameters(EngineFlags)


@model_command(app, "start", _engine_flags)
def start(
    given: Given,
    detach: bool = typer.Option(
        False, "--detach", "-d", help="keep running in the background (log to a file)"
    ),
    json_output: bool = typer.Option(
        False, "--json", help="print the started engine as JSON (with --detach)"
    ),
) -> None:
    """Run queued jobs: one child process per job, one per GPU slot (or CPU slot), or one Ray
    task per job on a cluster (--executor ray; --cpu-slots then caps the runs in flight)."""
    from engine import paths
    from engine.daemon import build_flags, serve
    from engine.run_environment import check_run_environment
    from mesa_tui.commands.jobs import open_store
    from store.health import check_integrity

    check_run_environment()  # its jobs inherit MESA_TUI_*: a bad value would fail every one
    flags = build_flags(given.values)
    config = flags.config()  # refuses bad GPUs and executor settings before anything starts
    # Refuses a damaged or unusable store and an old schema before anything starts, then reads
    # the whole file once (PRAGMA integrity_check): an engine must not write into damage.
    store = open_store()
    check_integrity(store.engine, store.url)
    if not detach:
        serve(config, check_store=False)
        return
    log_dir = paths.data_home() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = flags.log or str(log_dir / f"engine-{time.strftime('%Y%m%d-%H%M%S')}.log")
    child = build_flags({**given.values, "log": log_path})
    command = [sys.executable, "-m", "engine.daemon", *child.argv(), "--store-checked"]
    env = dict(os.environ)
    env["MESA_TUI_DB"] = store.url
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True, env=env,
        )  # fmt: skip
    deadline = time.monotonic() + (120 if config.executor == "ray" else 30)
    while time.monotonic() < deadline:
        engines = [
            e for e in store.engines() if e.pid == process.pid and e.host == socket.gethostname()
        ]
        if engines and engines[0].alive:
            engine = engines[0]
            if json_output:
                from store.entities import to_json

                print_json({"engine": to_json(engine), "log": str(log_path)})
            else:
                typer.echo(
                    f"engine {engine.id} started (pid {engine.pid}, {engine.slots} slot(s)); log: {log_path}"
                )
            return
        if process.poll() is not None:
            tail = Path(log_path).read_text(errors="replace").strip().splitlines()[-3:]
            if process.returncode == 2 and tail and tail[-1].startswith("error: "):
                typer.echo(tail[-1], err=True)  # a one-line refusal (a store problem)
                raise typer.Exit(2)
            typer.echo(f"error: the engine exited at start: {' | '.join(tail)}", err=True)
            raise typer.Exit(1)
        time.sleep(0.1)
    typer.echo(f"error: the engine did not report in time; see {log_path}", err=True)
    raise typer.Exit(1)


@app.command("stop")
@cli_errors
def stop(
    wait: bool = typer.Option(True, "--wait/--no-wait", help="wait until the engines have stopped"),
    timeout: float = typer.Option(60.0, help="seconds to wait"),
    json_output: bool = typer.Option(False, "--json", help="one JSON object"),
) -> None:
    """Stop every running engine; their running jobs stop and are queued again."""
    from engine.executors.local import engine_process_alive  # a reused pid is not signalled
    from mesa_tui.commands.jobs import open_store

    store = open_store()
    asked = store.request_engine_stop()
    host = socket.gethostname()
    for engine in asked:
        if engine.host == host and engine_process_alive(engine.pid, engine.started_at):
            with contextlib.suppress(ProcessLookupError):
                os.kill(engine.pid, signal.SIGTERM)
    stopped = []
    if wait and asked:
        deadline = time.monotonic() + timeout
        pending = {e.id for e in asked}
        while pending and time.monotonic() < deadline:
            for e in store.engines():
                if e.id in pending and (e.stopped_at is not None or not e.alive):
                    pending.discard(e.id)
                    stopped.append(e.id)
            time.sleep(0.2)
    if json_output:
        print_json({"asked": [e.id for e in asked], "stopped": stopped})
        return
    if not asked:
        typer.echo("no engine is running")
    for e in asked:
        state = "stopped" if e.id in stopped or not wait else "still stopping"
        typer.echo(f"engine {e.id} (pid {e.pid} on {e.host}) {state if wait else 'asked to stop'}")


@app.command("status")
@cli_errors
def status(json_output: bool = typer.Option(False, "--json", help="one JSON object")) -> None:
    """Whether an engine is alive, its slots and GPUs, and the queue."""
    from mesa_tui.commands.jobs import age, open_store
    from store.entities import STATUSES, to_json

    store = open_store()
    engines = store.engines(alive_only=True)
    counts = store.job_counts()
    if json_output:
        print_json(
            {
                "alive": bool(engines),
                "engines": [to_json(e) for e in engines],
                "jobs": {s: counts.get(s, 0) for s in STATUSES},
                "store": store.url,
            }
        )
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not engines:
        console.print("no engine is running; start one with `mesa-tui engine start --detach`")
    else:
        table = Table(box=None, header_style="bold")
        for column in ("engine", "host", "pid", "slots", "gpus", "heartbeat", "started", "version"):
            table.add_column(column)
        for e in engines:
            gpus = (
                ", ".join(
                    f"{g.index}:{g.name}"
                    + (
                        f" {g.memory_used_mb / 1024:.1f}/{g.memory_total_mb / 1024:.0f} GiB"
                        if g.memory_used_mb is not None and g.memory_total_mb
                        else ""
                    )
                    + (f" {g.utilization_pct:.0f}%" if g.utilization_pct is not None else "")
                    for g in e.gpus
                )
                or "cpu"
            )
            table.add_row(
                str(e.id),
                e.host,
                str(e.pid),
                f"{e.slots_used}/{e.slots}",
                gpus,
                age(e.heartbeat_at),
                age(e.started_at),
                e.version,
            )
        console.print(table)
    console.print("jobs: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES))
