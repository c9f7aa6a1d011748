"""``mesa-tui report STUDY_OR_JOB --out DIR``: a Markdown report with figures and CSV tables."""

from __future__ import annotations

from pathlib import Path

import typer

from mesa_tui.commands.common import cli_errors, print_json


def report_command(
    target: str = typer.Argument(
        ...,
        help="a study name, a job id, or a paper_study.py result folder",
        metavar="STUDY_OR_JOB_OR_FOLDER",
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="directory to write (default: <data home>/reports/<name>-<timestamp>)",
    ),
    force: bool = typer.Option(False, "--force", help="replace a non-empty --out directory"),
    gpu_results: list[Path] = typer.Option(
        [],
        "--gpu-results",
        help="a benchmarks/gpu_bench.py JSON file to show (repeatable)",
    ),
    json_output: bool = typer.Option(
        False, "--json", help='print {"report": path, "figures": [...], "tables": [...]}'
    ),
) -> None:
    """Write DIR/report.md: the study's table beside the paper's numbers, the ASR-per-trigger
    figure, attack and repair curves, each MESA search (sample grids, embedding, hinge and MINE
    curves, validity histogram), cost, GPU results and provenance; a job gets the sections that
    apply to it and its upstream jobs; a result folder of benchmarks/paper_study.py gets the
    paper's figure with intervals and the paired statistics. Every table's CSV is under
    DIR/tables."""
    from engine.report import build_report, default_report_dir, paper, resolve_target
    from mesa_tui.commands.jobs import open_store

    # A result folder is read from its files alone: no store is opened (or needs upgrading).
    store = None if paper.is_results_folder(str(target).strip()) else open_store()
    if out is None:
        kind, key = resolve_target(store, target)
        name = {"study": str(key), "results": Path(str(key)).name}.get(kind, f"job-{key}")
        out = default_report_dir(name)
    result = build_report(store, target, out, force=force, gpu_results=gpu_results)
    if json_output:
        print_json(result.to_json())
    else:
        typer.echo(
            f"wrote {result.report} ({len(result.figures)} figures, {len(result.tables)} tables)"
            + (f"; {result.unfinished}" if result.unfinished else "")
        )


def register(app: typer.Typer) -> None:
    app.command("report")(cli_errors(report_command))
