"""Foreground runs (``mesa-tui run <kind>``): a rich progress reporter and the results table.

With ``--json`` the progress goes to stderr and stdout carries exactly one JSON object.
"""

from __future__ import annotations

import importlib
import secrets
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from engine import paths
from engine.reporter import TaskResult


def _fmt(value: float) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    return str(value)


class RichReporter:
    """Shows progress bars per stage and log lines; keeps the metrics it was given."""

    def __init__(self, workdir: Path, console: Console, resume: bool = False, quiet: bool = False):
        self.workdir = workdir
        self.resume = resume
        self.console = console
        self.quiet = quiet
        self.metrics: dict[str, tuple[int, float]] = {}
        self.artifacts: list[tuple[str, str]] = []
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            disable=quiet,
        )
        self._tasks: dict[str, Any] = {}
        self._last_refresh = 0.0

    def __enter__(self) -> RichReporter:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.metrics[key] = (step, float(value))
        evals = {k: v for k, v in metrics.items() if k.startswith("eval/") and "/" not in k[5:]}
        if evals and not self.quiet:
            epoch = metrics.get("train/epoch") or metrics.get("repair/epoch")
            head = f"epoch {int(epoch)}" if epoch else f"step {step}"
            self._progress.console.print(
                f"  {head}: " + "  ".join(f"{k[5:]} {_fmt(v)}" for k, v in evals.items())
            )

    def check_in(self, next_within_s: float) -> None:
        pass

    def artifact(self, path: str | Path, kind: str) -> None:
        self.artifacts.append((str(path), kind))

    def should_stop(self) -> bool:
        return False

    def text(self, message: str, level: str = "info") -> None:
        if not self.quiet or level in ("warning", "error"):
            style = {"warning": "yellow", "error": "red"}.get(level, "dim")
            self._progress.console.print(f"[{style}]{message}[/{style}]")

    def progress(self, stage: str, done: int, total: int, info: dict[str, float]) -> None:
        if self.quiet:
            return
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(stage, total=total, info="")
        text = "  ".join(f"{k} {_fmt(v)}" for k, v in info.items())
        self._progress.update(self._tasks[stage], completed=done, total=total, info=text)


def new_workdir(kind: str) -> Path:
    """A fresh artifact directory under the data home (created by the task)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return paths.artifacts_dir() / f"{kind}-{stamp}-{secrets.token_hex(3)}"


def results_table(result: TaskResult, title: str) -> Table:
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in sorted(result.metrics.items()):
        if "/acc_class/" in key:
            continue
        table.add_row(key, _fmt(value))
    for key, value in result.extra.items():
        if isinstance(value, (str, int, float, list)) and key not in ("environment",):
            table.add_row(key, str(value))
    table.add_row("artifact", str(result.artifact))
    return table


def run_foreground(
    kind: str, spec: Any, json_output: bool, workdir: Path | None = None
) -> TaskResult:
    """Run ``engine.tasks.<kind>.run(spec, reporter)`` here, with progress, then print results."""
    from engine.run_environment import check_run_environment
    from mesa_tui.commands.common import print_json

    check_run_environment()  # a bad MESA_TUI_* value: one line, before the run is recorded
    task = importlib.import_module(f"engine.tasks.{kind}")
    console = Console(stderr=json_output)
    workdir = workdir or new_workdir(kind)
    recorder = _store_recorder(kind, spec, console)
    with RichReporter(workdir, console, quiet=False) as reporter:
        active = recorder.wrap(reporter) if recorder else reporter
        try:
            result = task.run(spec, active)
        except BaseException as exc:
            if recorder:
                recorder.finish(None, exc)
            raise
    if recorder:
        recorder.finish(result, None)
    if json_output:
        print_json(result.to_json())
    else:
        console.print(results_table(result, f"{kind} results"))
    return result


def _store_recorder(kind: str, spec: Any, console: Console) -> Any:
    """Foreground runs are recorded in the store when it is available (the store work hooks in
    ``engine.recording``); a store problem never stops a foreground run."""
    from engine.recording import ForegroundRecorder

    try:
        return ForegroundRecorder.start(kind, spec)
    except Exception as exc:  # the store is optional for a foreground run
        # One line however long (a store problem names the file and the fix; see store.health).
        console.print(
            f"[yellow]warning: this run is not recorded in the store ({exc})[/yellow]",
            soft_wrap=True,
            markup=True,
        )
        return None
