"""``mesa-tui study create|list|show|export``: named groups of pipelines made from templates."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import typer

from mesa_tui.commands.common import cli_errors, print_json

app = typer.Typer(
    help="Studies: pipelines from a template, summarised like the paper.", no_args_is_help=True
)


def _seeds(value: str) -> list[int]:
    from engine.errors import UserError

    try:
        seeds = [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"invalid --seeds {value!r}: give seeds like 0,1,2") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise UserError(f"invalid --seeds {value!r}: give distinct non-negative seeds like 0,1,2")
    return seeds


@app.command("create", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@cli_errors
def create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="a new study name"),
    template: str = typer.Option(
        ...,
        "--template",
        "-t",
        help="paper-cifar10-bw, paper-cifar10-color, paper-cifar100-color or cpu-mini",
    ),
    seeds: str = typer.Option(
        "0", "--seeds", help="repeat every pipeline with these seeds, e.g. 0,1,2"
    ),
    target: str = typer.Option(
        "auto",
        help="auto: detect the attacked class (default); oracle: tell the search each target",
    ),
    reuse: bool = typer.Option(True, "--reuse/--no-reuse", help="reuse identical finished jobs"),
    json_output: bool = typer.Option(False, "--json", help='print {"study": NAME, "jobs": [ids]}'),
) -> None:
    """Create a study and queue its jobs. Stage settings pass through as in `submit pipeline`
    (--train-epochs 2, --mesa-steps 100, --stamp-rate 0.1; --clean-epochs for the clean model)."""
    from engine.pipelines import apply_reuse, build_study, dedupe
    from mesa_tui.commands.jobs import open_store
    from mesa_tui.commands.submit import parse_extra

    overrides = parse_extra(list(ctx.args))
    params, jobs = build_study(template, _seeds(seeds), overrides, target)
    jobs = dedupe(jobs)
    store = open_store()
    if reuse:
        jobs = apply_reuse(store, jobs)
    _, ids = store.create_study(name, template, params, jobs)
    reused = sorted({i for i, j in zip(ids, jobs, strict=True) if j.reuse_of is not None})
    if json_output:
        print_json({"study": name, "jobs": ids, "reused": reused})
    else:
        typer.echo(
            f"study {name}: {len(ids)} jobs queued from {template}"
            + (f" ({len(reused)} reused)" if reused else "")
        )


@app.command("list")
@cli_errors
def list_studies(json_output: bool = typer.Option(False, "--json", help="one JSON object")) -> None:
    """Every study with its job counts."""
    from mesa_tui.commands.jobs import open_store
    from store.entities import to_json

    studies = open_store().studies()
    if json_output:
        print_json({"studies": [to_json(s) for s in studies]})
        return
    if not studies:
        typer.echo("no studies; create one with `mesa-tui study create NAME --template cpu-mini`")
    for s in studies:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(s.status_counts.items()))
        typer.echo(f"{s.name}  ({s.template}): {s.job_count} jobs: {counts}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


@app.command("show")
@cli_errors
def show(
    name: str = typer.Argument(..., help="study name"),
    json_output: bool = typer.Option(False, "--json", help="one JSON object"),
) -> None:
    """The study's table: ASR after repair per method (mean, worst, spread over seeds), clean and
    robust accuracy, with the paper's numbers beside ours and the protocol differences."""
    from mesa_tui.commands.jobs import open_store
    from store.entities import to_json

    summary = open_store().study_summary(name)
    if json_output:
        data = to_json(summary)
        data["metrics"] = {
            f"{row.method}/asr_mean": row.asr_mean
            for row in summary.rows
            if row.asr_mean is not None
        }
        print_json(data)
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    info = summary.study
    counts = ", ".join(f"{n} {k}" for k, n in sorted(info.status_counts.items()))
    console.print(
        f"[bold]study {info.name}[/bold] ({info.template}): {info.job_count} jobs: {counts}"
    )
    table = Table(
        box=None,
        header_style="bold",
        caption="asr: of the original trigger on held-out images; worst: highest after repair, "
        "lowest before; sd: spread of the per-seed means; ra: robust accuracy",
    )
    for column in ("method", "done", "asr", "worst", "sd", "acc", "ra", "paper", "p.worst"):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=True)
    for row in summary.rows:
        table.add_row(
            row.method,
            f"{row.done}/{row.cells}",
            _pct(row.asr_mean),
            _pct(row.asr_worst),
            _pct(row.asr_seed_std),
            _pct(row.acc_clean_mean),
            _pct(row.ra_mean),
            _pct(row.paper_asr_mean),
            _pct(row.paper_asr_worst),
        )
    console.print(table)
    console.print("protocol differences from the paper:")
    for note in summary.protocol_notes:
        console.print(f"  - {note}")


@app.command("export")
@cli_errors
def export(
    name: str = typer.Argument(..., help="study name"),
    format: str = typer.Option(
        "csv",
        "--format",
        help="csv (one row per job), json (the summary) or tensorboard (event files per job)",
    ),
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        help="write to this file instead of stdout (tensorboard: a new directory, required)",
    ),
) -> None:
    """Export a study: every cell (trigger, method, seed) as CSV, the whole summary as JSON, or
    every job as a TensorBoard run (its metric series, trigger grids and spec) under -o DIR."""
    import json

    from engine.errors import UserError
    from mesa_tui.commands.jobs import open_store
    from store.entities import to_json

    if format not in ("csv", "json", "tensorboard"):
        raise UserError(f"invalid --format {format!r}: use csv, json or tensorboard")
    if format == "tensorboard":
        from engine.report import tensorboard

        tensorboard.check_available()
        if output is None:
            raise UserError("--format tensorboard writes a directory of runs; give -o DIR")
        store = open_store()
        members = store.study_members(name)
        written = tensorboard.export_jobs(store, [m.job_id for m in members], output)
        typer.echo(
            f"wrote {len(written['runs'])} TensorBoard runs of study {name} to "
            f"{written['directory']} (view: tensorboard --logdir {written['directory']})"
        )
        return
    summary = open_store().study_summary(name)
    if format == "json":
        text = json.dumps(to_json(summary), indent=2) + "\n"
    else:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["trigger", "method", "seed", "job_id", "status", "asr", "acc_clean", "ra"])
        for c in summary.cells:
            writer.writerow(
                [c.trigger, c.method, c.seed, c.job_id, c.status, c.asr, c.acc_clean, c.ra]
            )
        text = buffer.getvalue()
    if output:
        output.write_text(text)
        typer.echo(f"wrote {output}")
    else:
        typer.echo(text, nl=False)
