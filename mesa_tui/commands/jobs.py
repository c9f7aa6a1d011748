"""Job commands: ``ls``, ``show``, ``logs``, ``metrics``, ``cancel``, ``retry``, ``rm``, ``tag``,
``note``.

Faces write requests only; the engine does the work. ``--json`` prints one object.
"""

from __future__ import annotations

import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer

from mesa_tui.commands.common import cli_errors, print_json

STATUS_STYLE = {
    "queued": "cyan",
    "running": "yellow",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "magenta",
    "lost": "red",
}


def open_store() -> Any:
    """The store of ``--db`` / ``MESA_TUI_DB`` (SQLite in the data home by default)."""
    from store.repository import Store

    return Store()


def styled(status: str) -> str:
    style = STATUS_STYLE.get(status, "white")
    return f"[{style}]{status}[/{style}]"


def age(when: datetime | None) -> str:
    if when is None:
        return "-"
    seconds = (datetime.now(UTC) - when).total_seconds()
    if seconds < 90:
        return f"{seconds:.0f}s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f}h ago"
    return when.strftime("%Y-%m-%d %H:%M")


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def job_json(job: Any) -> dict[str, Any]:
    from store.entities import to_json

    data = to_json(job)
    data["metrics"] = dict(job.latest)
    return data


def ls(
    status: str | None = typer.Option(
        None,
        "--status",
        help="queued, running, succeeded, failed, cancelled or lost (commas: several)",
    ),
    study: str | None = typer.Option(None, "--study", help="only jobs of this study"),
    kind: str | None = typer.Option(None, "--kind", help="train, mesa, detect or defend"),
    limit: int | None = typer.Option(None, "--limit", help="only the newest N jobs"),
    find: str | None = typer.Option(
        None, "--find", help="only jobs whose label, note or a tag contains this (any case)"
    ),
    json_output: bool = typer.Option(False, "--json", help='one JSON object: {"jobs": [...]}'),
) -> None:
    """List jobs (oldest first)."""
    store = open_store()
    statuses = [s.strip() for s in status.split(",")] if status else None
    jobs = store.list_jobs(
        status=statuses, kind=kind, study=study, limit=limit, newest_first=bool(limit), text=find
    )
    if limit:
        jobs.reverse()
    if json_output:
        print_json({"jobs": [job_json(j) for j in jobs]})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=True, header_style="bold", box=None)
    for column in ("id", "kind", "status", "label", "progress", "acc", "asr", "attempt", "updated"):
        table.add_column(
            column,
            justify="right" if column in ("id", "acc", "asr") else "left",
            no_wrap=column not in ("label", "progress"),
        )
    for j in jobs:
        progress = (
            f"{j.progress.stage} {j.progress.fraction:.0%}"
            if j.progress and j.status == "running"
            else ""
        )
        table.add_row(
            str(j.id),
            j.kind,
            styled(j.status)
            + (" (cancelling)" if j.cancel_requested and j.status == "running" else ""),
            " ".join([j.label or "", *(f"#{t}" for t in j.tags)]).strip(),
            progress,
            fmt(j.latest.get("eval/acc_clean")),
            fmt(j.latest.get("eval/asr")),
            f"{j.attempts}/{j.max_attempts}",
            age(j.updated_at),
        )
    console = Console()
    if jobs:
        console.print(table)
    else:
        console.print("no jobs; submit one with `mesa-tui submit pipeline --preset cpu-quick`")


def show(
    job_id: int = typer.Argument(..., help="job id (see mesa-tui ls)"),
    json_output: bool = typer.Option(False, "--json", help="one JSON object"),
    format: str = typer.Option(
        "text",
        "--format",
        help="text, json (as --json) or tensorboard (the job as a TensorBoard run under -o DIR)",
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="--format tensorboard: a new directory to write"
    ),
) -> None:
    """Everything about one job: spec, attempts, dependencies, artifacts, latest metrics; with
    --format tensorboard, its metric series, trigger grids and spec as event files."""
    from engine.errors import UserError

    if format not in ("text", "json", "tensorboard"):
        raise UserError(f"invalid --format {format!r}: use text, json or tensorboard")
    if format == "tensorboard":
        _show_tensorboard(job_id, output, json_output)
        return
    if output is not None:
        raise UserError("-o is for --format tensorboard; text and json print to stdout")
    detail = open_store().job_detail(job_id)
    if json_output or format == "json":
        print_json(_detail_json(detail))
    else:
        _print_detail(detail)


RUN_COLUMNS = ("run", "attempt", "status", "host", "pid", "gpu", "resumed", "started", "ended")
ENV_KEYS = ("torch", "cuda", "device_name", "code_version", "dataset_hash", "seed")


def _show_tensorboard(job_id: int, output: Path | None, json_output: bool) -> None:
    from engine.errors import UserError
    from engine.report import tensorboard

    tensorboard.check_available()
    if output is None:
        raise UserError("--format tensorboard writes a directory; give -o DIR")
    store = open_store()
    store.job(job_id)  # one line naming an unknown job before anything is written
    written = tensorboard.export_jobs(store, [job_id], output)
    if json_output:
        print_json(written)
        return
    run = written["runs"][0]
    typer.echo(
        f"wrote job {job_id} as TensorBoard run {run['run']} ({run['scalars']} series, "
        f"{len(run['images'])} images) to {written['directory']}"
    )


def _detail_json(detail) -> dict:
    from store.entities import to_json

    job, result = detail.job, detail.result or {}
    data = to_json(detail)
    data.update(
        id=job.id,
        kind=job.kind,
        status=job.status,
        label=job.label,
        spec=job.spec,
        error=job.error,
        artifact=result.get("artifact")
        or (detail.artifacts[-1].path if detail.artifacts else None),
        metrics={**job.latest, **result.get("metrics", {})},
    )
    for key, value in result.items():
        data.setdefault(key, value)
    return data


def _print_detail(detail) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    job = detail.job
    _print_header(console, detail)
    spec = Table("setting", "value", box=None, header_style="bold")
    for key, value in job.spec.items():
        spec.add_row(key, fmt(value))
    console.print(spec)
    if detail.runs:
        _print_runs(console, detail.runs)
    if job.latest:
        metrics = Table("metric", "latest", box=None, header_style="bold")
        for key in sorted(job.latest):
            metrics.add_row(key, fmt(job.latest[key]))
        console.print(metrics)
    for a in detail.artifacts:
        console.print(
            f"  artifact {a.kind}: {a.path}  ({fmt(a.bytes)} bytes, sha256 {str(a.sha256)[:12]})"
        )


def _print_header(console, detail) -> None:
    """The job's line, its error, studies, dependencies and where it works."""
    job = detail.job
    console.print(f"[bold]job {job.id}[/bold] {job.kind} {styled(job.status)}  {job.label}")
    if job.error:
        console.print(f"  [red]{job.error}[/red]")
    if job.tags:
        console.print(f"  tags: {' '.join(job.tags)}")
    if job.note:
        console.print(f"  note: {job.note}", markup=False, highlight=False)
    if job.studies:
        console.print(f"  studies: {', '.join(job.studies)}")
    if detail.depends_on:
        console.print(
            "  after: "
            + ", ".join(
                f"{d.job_id} ({d.kind}, {d.status}{', ' + d.input_field if d.input_field else ''})"
                for d in detail.depends_on
            )
        )
    if detail.dependents:
        console.print(f"  needed by: {', '.join(map(str, detail.dependents))}")
    console.print(f"  workdir: {detail.workdir or '-'}   spec hash: {job.spec_hash[:12]}")


def _print_runs(console, runs) -> None:
    """Every attempt, then the last attempt's environment."""
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in (*RUN_COLUMNS, "error"):
        table.add_column(column)
    for r in runs:
        table.add_row(
            str(r.id),
            str(r.attempt),
            styled(r.status),
            r.host or "-",
            r.external_id or "-",
            r.gpu or "-",
            "yes" if r.resumed else "no",
            age(r.started_at),
            age(r.ended_at),
            (r.error or "")[:60],
        )
    console.print(table)
    env = runs[-1].env
    if env:
        shown = [f"{k} {env[k]}" for k in ENV_KEYS if env.get(k) not in (None, "")]
        console.print("  env: " + "  ".join(shown))


def logs(
    job_id: int = typer.Argument(..., help="job id"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing until the job ends"),
    output: bool = typer.Option(False, "--output", help="also print the child's raw output file"),
) -> None:
    """Log lines of every attempt of a job, each labelled with its attempt (a lost attempt's
    lines stay); --follow tails a running job (exit 1 if it then fails)."""
    from engine import paths

    store = open_store()
    store.job(job_id)
    cursor = 0
    attempts: dict[int, int] = {}
    while True:
        for entry in store.logs(job_id=job_id, after_id=cursor):
            cursor = entry.id
            if entry.run_id not in attempts:  # a run that started since the last read
                attempts.update((r.id, r.attempt) for r in store.runs(job_id))
            stamp = datetime.fromtimestamp(entry.wall_time, UTC).strftime("%H:%M:%S")
            attempt = attempts.get(entry.run_id, "?")
            typer.echo(f"[attempt {attempt}] {stamp} {entry.level:7s} {entry.message}")
        job = store.job(job_id)
        if not follow or job.status not in ("queued", "running"):
            break
        time.sleep(0.5)
    if output:
        for run in store.runs(job_id):
            path = paths.data_home() / "logs" / f"run-{run.id}.log"
            if path.exists():
                typer.echo(f"--- output of run {run.id} ({path})")
                typer.echo(path.read_text(errors="replace").rstrip())
    job = store.job(job_id)
    if job.error and job.status in ("failed", "lost", "cancelled"):
        typer.echo(f"job {job_id} {job.status}: {job.error}")
    if follow and job.status in ("failed", "lost"):
        raise typer.Exit(1)


def metrics(
    job_id: int = typer.Argument(..., help="job id"),
    key: str | None = typer.Option(None, "--key", "-k", help="metric key, e.g. eval/asr"),
    tail: int | None = typer.Option(None, "--tail", help="only the last N points"),
    json_output: bool = typer.Option(False, "--json", help="one JSON object"),
) -> None:
    """A metric's series across attempts (joined at each resume), or the job's keys."""
    store = open_store()
    job = store.job(job_id)
    if key is None:
        keys = store.metric_keys(job_id)
        if json_output:
            print_json({"job": job_id, "keys": keys, "metrics": dict(job.latest)})
        else:
            for k in keys:
                typer.echo(f"{k}\t{fmt(job.latest.get(k))}")
        return
    series = store.metric_series(job_id, key)
    if not series and key not in store.metric_keys(job_id):
        from engine.errors import UserError

        known = ", ".join(store.metric_keys(job_id)[:12]) or "none yet"
        raise UserError(f"job {job_id} has no metric '{key}'; its keys: {known}")
    if tail:
        series = series[-tail:]
    if json_output:
        print_json(
            {
                "job": job_id,
                "key": key,
                "points": [
                    {
                        "step": p.step,
                        "value": p.value,
                        "attempt": p.attempt,
                        "run_id": p.run_id,
                        "wall_time": p.wall_time,
                    }
                    for p in series
                ],
                "metrics": {key: series[-1].value} if series else {},
            }
        )
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("step", key, "attempt", box=None, header_style="bold")
    for p in series:
        table.add_row(str(p.step), fmt(p.value), str(p.attempt))
    Console().print(table)


def cancel(
    job_id: int = typer.Argument(..., help="job id"),
    json_output: bool = typer.Option(False, "--json", help="one JSON object"),
) -> None:
    """Cancel a job: a queued one at once, a running one within seconds (dependents too)."""
    from store.entities import FINISHED

    store = open_store()
    before = store.job(job_id)
    job = store.request_cancel(job_id)
    if json_output:
        print_json(job_json(job))
        return
    if before.status in FINISHED:
        typer.echo(f"job {job_id} already {before.status}; nothing to cancel")
    elif job.status == "cancelled":
        typer.echo(f"job {job_id} cancelled")
    else:
        typer.echo(f"job {job_id}: cancel requested; its engine stops it within 10 seconds")


def retry(
    job_id: int = typer.Argument(..., help="job id"),
    json_output: bool = typer.Option(False, "--json", help="one JSON object"),
) -> None:
    """Queue a failed, cancelled or lost job again (and the dependents it took down)."""
    store = open_store()
    job = store.retry(job_id)
    if json_output:
        print_json(job_json(job))
    else:
        typer.echo(
            f"job {job_id} queued again (up to {job.max_attempts - job.attempts} more attempts)"
        )


def rm(
    job_id: int = typer.Argument(..., help="job id"),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask"),
    json_output: bool = typer.Option(False, "--json", help="one JSON object"),
) -> None:
    """Delete a finished job, its runs and metrics, and its artifacts on disk (asks first)."""
    from engine import paths
    from engine.errors import UserError

    store = open_store()
    job = store.job(job_id)
    if not yes:
        if not sys.stdin.isatty():
            raise UserError(f"deleting job {job_id} needs confirmation; add --yes")
        typer.confirm(
            f"delete job {job_id} ({job.kind} {job.label}) and its artifacts?", abort=True
        )
    removed, kept = [], []
    root = paths.artifacts_dir().resolve()
    for path in store.delete_job(job_id):
        p = Path(path).resolve()
        # Only what mesa-tui made under its data home is removed; outside paths are the user's.
        if p.is_relative_to(root) and p.exists():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(str(p))
        elif p.exists():
            kept.append(str(p))
    if json_output:
        print_json({"deleted": job_id, "removed": removed, "kept": kept})
        return
    typer.echo(f"job {job_id} deleted" + (f"; removed {len(removed)} path(s)" if removed else ""))
    for p in kept:
        typer.echo(f"kept {p} (outside {root})")


def tag(
    job_id: int = typer.Argument(..., help="job id"),
    tags: list[str] = typer.Argument(..., help="one word each, e.g. baseline paper"),
    remove: bool = typer.Option(False, "--remove", help="take these tags off instead"),
    json_output: bool = typer.Option(False, "--json", help="one JSON object"),
) -> None:
    """Tag a job (the app's jobs filter and ls --find find it by its tags)."""
    store = open_store()
    job = store.tag(job_id, remove=tags) if remove else store.tag(job_id, add=tags)
    if json_output:
        print_json(job_json(job))
    else:
        typer.echo(f"job {job_id} tags: {' '.join(job.tags) or '(none)'}")


def note(
    job_id: int = typer.Argument(..., help="job id"),
    text: str = typer.Argument(..., help='the note, quoted; "" clears it'),
    json_output: bool = typer.Option(False, "--json", help="one JSON object"),
) -> None:
    """Write a note on a job, replacing its old one (the jobs filter finds it by its words)."""
    store = open_store()
    job = store.set_note(job_id, text)
    if json_output:
        print_json(job_json(job))
    else:
        typer.echo(f"job {job_id} note: {job.note}" if job.note else f"job {job_id} note cleared")


def jobs_table(jobs: list[Any]) -> Any:
    """Progress while jobs run; the results (clean accuracy, ASR, robust accuracy) once done."""
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in ("id", "kind", "label", "status", "progress", "acc", "asr", "ra"):
        table.add_column(
            column, justify="right" if column in ("id", "acc", "asr", "ra") else "left"
        )
    for j in jobs:
        progress = ""
        if j.status == "running" and j.progress is not None:
            progress = f"{j.progress.stage} {j.progress.done}/{j.progress.total}"
        table.add_row(
            str(j.id),
            j.kind,
            j.label,
            styled(j.status),
            progress,
            fmt(j.latest.get("eval/acc_clean")),
            fmt(j.latest.get("eval/asr")),
            fmt(j.latest.get("eval/ra")),
        )
    return table


def _tenth(job: Any) -> tuple[str, int] | None:
    """The running job's stage and how many tenths of it are done (None when not running)."""
    p = job.progress
    if job.status != "running" or p is None or not p.total:
        return None
    return p.stage, min(10, 10 * p.done // p.total)


def progress_line(job: Any) -> str:
    """One plain line for a log: time, job, status, its stage's share done, or its results."""
    parts = [datetime.now().strftime("%H:%M:%S"), f"job {job.id}", job.kind, job.label, job.status]
    tenth = _tenth(job)
    if tenth is not None:
        parts.append(f"{tenth[0]} {100 * job.progress.done // job.progress.total}%")
    if job.status not in ("queued", "running"):
        for key, name in (("eval/acc_clean", "acc"), ("eval/asr", "asr"), ("eval/ra", "ra")):
            if job.latest.get(key) is not None:
                parts.append(f"{name} {fmt(job.latest[key])}")
    return "  ".join(parts)


def follow_jobs(store: Any, ids: list[int], poll_s: float = 1.0) -> list[Any]:
    """Redraw the jobs' table until every one has ended; returns their final summaries.

    Where standard output is not a terminal (``nohup``, ``| tee``, a CI log) nothing can be
    redrawn, so each job gets a line when its status changes and at every tenth of a running stage,
    and the results table is printed once at the end."""
    from rich.console import Console
    from rich.live import Live

    def current() -> list[Any]:
        by_id = {j.id: j for j in store.list_jobs()}
        return [by_id[i] for i in ids if i in by_id]

    def active() -> bool:
        return any(j.status in ("queued", "running") for j in jobs)

    jobs = current()
    console = Console()
    if not console.is_terminal:
        shown: dict[int, tuple[str, tuple[str, int] | None]] = {}
        while True:
            for j in jobs:
                if shown.get(j.id) != (j.status, _tenth(j)):
                    shown[j.id] = (j.status, _tenth(j))
                    typer.echo(progress_line(j))
            if not active():
                break
            time.sleep(poll_s)
            jobs = current()
        console.print(jobs_table(jobs))
        return jobs
    with Live(jobs_table(jobs), console=console, refresh_per_second=2) as live:
        while active():
            time.sleep(poll_s)
            jobs = current()
            live.update(jobs_table(jobs))
    return jobs


def wait(
    job_ids: list[int] = typer.Argument(..., help="job ids (see mesa-tui ls)"),
    json_output: bool = typer.Option(False, "--json", help="one JSON object when all have ended"),
) -> None:
    """Follow jobs until they end, then print their results; exit 1 if one failed or was lost."""
    store = open_store()
    for job_id in job_ids:
        store.job(job_id)
    if json_output:
        while any(store.job(i).status in ("queued", "running") for i in job_ids):
            time.sleep(1.0)
        jobs = [store.job(i) for i in job_ids]
        print_json({"jobs": [job_json(j) for j in jobs]})
    else:
        jobs = follow_jobs(store, job_ids)
    if any(j.status in ("failed", "lost") for j in jobs):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the job commands to the top-level app."""
    for name, fn in (
        ("ls", ls),
        ("show", show),
        ("logs", logs),
        ("metrics", metrics),
        ("cancel", cancel),
        ("retry", retry),
        ("rm", rm),
        ("wait", wait),
        ("tag", tag),
        ("note", note),
    ):
        app.command(name)(cli_errors(fn))
