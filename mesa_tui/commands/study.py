"""``mesa-tui study create|list|show|export``: named groups of pipelines made from templates."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import typer

from mesa_tui.commands.common import cli_errors, print_json

if TYPE_CHECKING:
    from rich.console import Group

app = typer.Typer(
    help="Studies: pipelines from a template, summarised like the paper.", no_args_is_help=True
)
T = TypeVar("T")
STUDY_NAME = "a study name (`mesa-tui study list`)"


def from_store(command: str, name: str, read: Callable[[str], T], results: bool = True) -> T:
    """``read(name)`` from the store; a name it lacks that names a path is one line about the
    path ("study ... does not exist" hid a file or a mistyped folder). ``results``: the command
    also takes a result folder."""
    from engine.errors import UserError
    from engine.report import paper
    from store.repository import UnknownStudy

    try:
        return read(name)
    except UnknownStudy:
        problem = paper.path_problem(name, STUDY_NAME, results)
        if problem is None:
            raise
        raise UserError(f"study {command}: {problem}") from None


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
        help="paper-cifar10-bw, paper-cifar10-bw-small, paper-cifar10-color, "
        "paper-cifar100-color, cpu-mini or defense-bar",
    ),
    seeds: str = typer.Option(
        "0", "--seeds", help="repeat every pipeline with these seeds, e.g. 0,1,2"
    ),
    target: str | None = typer.Option(
        None,
        help="auto: detect the attacked class (the default, but paper-cifar10-bw-small's is "
        "oracle); oracle: tell the search each target",
    ),
    triggers: str | None = typer.Option(
        None,
        "--triggers",
        help="only these of the template's triggers, e.g. bw:0,bw:85 (paper-cifar10-bw-small "
        "also takes pilot, even or odd)",
    ),
    reuse: bool = typer.Option(True, "--reuse/--no-reuse", help="reuse identical finished jobs"),
    json_output: bool = typer.Option(
        False, "--json", help='print {"study": NAME, "jobs": a list of ids}'
    ),
) -> None:
    """Create a study and queue its jobs. Stage settings pass through as in `submit pipeline`
    (--train-epochs 2, --mesa-steps 100, --stamp-rate 0.1; --clean-epochs for the clean model);
    paper-cifar10-bw-small takes every setting from engine/paper_small.py but --stamp-rate;
    defense-bar (benchmarks/defense.py's main part) also takes --rates 0.01,0.1 and --methods
    mesa,point (and --headline-rate, --residual-rates, --residual-methods) as the driver does."""
    from engine.pipelines import apply_reuse, build_study, dedupe
    from mesa_tui.commands.jobs import open_store
    from mesa_tui.commands.submit import parse_extra

    overrides = parse_extra(list(ctx.args))
    chosen = triggers.split(",") if triggers is not None else None
    params, jobs = build_study(template, _seeds(seeds), overrides, target, chosen)
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
    name: str = typer.Argument(
        ..., help="study name, or a benchmarks/paper_study.py result folder"
    ),
    json_output: bool = typer.Option(False, "--json", help="one JSON object"),
) -> None:
    """The study's table: ASR after repair per method (mean, worst, spread over seeds), clean and
    robust accuracy, with the paper's numbers beside ours and the protocol differences. Where the
    repairs wrote per-image outcomes, the mean comes with its 95 % interval and the JSON carries
    the study's statistics (engine/report/study_stats.py). A result folder of the paper-figure
    study shows the same statistics per stamping rate (engine/report/paper.py)."""
    from engine.report import paper
    from engine.report.study_stats import study_statistics
    from mesa_tui.commands.jobs import open_store
    from store.entities import to_json

    if paper.is_results_folder(name):
        show_results_folder(paper.summary(name), json_output)
        return
    store = open_store()
    summary = from_store("show", name, store.study_summary)
    statistics = study_statistics(store, name)
    if json_output:
        data = to_json(summary)
        data["metrics"] = {
            f"{row.method}/asr_mean": row.asr_mean
            for row in summary.rows
            if row.asr_mean is not None
        }
        data["statistics"] = statistics
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
    intervals = _intervals(statistics)
    for row in summary.rows:
        table.add_row(
            row.method,
            f"{row.done}/{row.cells}",
            intervals.get(row.method) or _pct(row.asr_mean),
            _pct(row.asr_worst),
            _pct(row.asr_seed_std),
            _pct(row.acc_clean_mean),
            _pct(row.ra_mean),
            _pct(row.paper_asr_mean),
            _pct(row.paper_asr_worst),
        )
    console.print(table)
    for line in _statistics_lines(statistics):
        console.print(line, highlight=False)
    if statistics and "wilcoxon" in statistics:
        console.print(versus_table(statistics["wilcoxon"], statistics["reference"]))
    console.print("protocol differences from the paper:")
    for note in summary.protocol_notes:
        console.print(f"  - {note}")


def _interval(mean: dict | None) -> str | None:
    """A mean and its interval (fractions) as text: 3.4% [2.1, 4.9]."""
    if not mean:
        return None
    return f"{_pct(mean['mean'])} [{100 * mean['lo']:.1f}, {100 * mean['hi']:.1f}]"


def _intervals(statistics: dict | None) -> dict[str, str]:
    """Per method the mean ASR over triggers with its bootstrap interval, where computed."""
    methods = (statistics or {}).get("methods", {})
    return {m: text for m, s in methods.items() if (text := _interval(s.get("asr_mean")))}


def _statistics_lines(statistics: dict | None) -> list[str]:
    """What the statistics add below the table: where the intervals come from and the paired
    test of the reference (MESA) against each other method."""
    if statistics is None:
        return []
    if "error" in statistics:
        return [f"statistics: not computed: {statistics['error']}"]
    lines = [
        f"asr [{statistics['level']:.0%} interval]: mean over the implanted triggers with its "
        f"percentile bootstrap, from the per-image outcomes of {statistics['records']} triggers"
        + (
            f"; not implanted, left out: {', '.join(statistics['not_implanted']['triggers'])}"
            if statistics["not_implanted"]["count"]
            else ""
        )
        + (
            f"; {len(statistics['without_outcomes'])} repairs without outcomes left out"
            if statistics["without_outcomes"]
            else ""
        )
    ]
    return lines


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
    from engine.report import paper
    from mesa_tui.commands.jobs import open_store
    from store.entities import to_json

    if format not in ("csv", "json", "tensorboard"):
        raise UserError(f"invalid --format {format!r}: use csv, json or tensorboard")
    if paper.is_results_folder(name):
        raise UserError(
            f"study export: '{name}' is a result folder, and export reads the store's studies; "
            f"show it with `mesa-tui study show {name}` (--json: its numbers) or write its "
            f"report with `mesa-tui report {name}`"
        )
    if format == "tensorboard":
        from engine.report import tensorboard

        tensorboard.check_available()
        if output is None:
            raise UserError("--format tensorboard writes a directory of runs; give -o DIR")
        store = open_store()
        members = from_store("export", name, store.study_members, results=False)
        written = tensorboard.export_jobs(store, [m.job_id for m in members], output)
        typer.echo(
            f"wrote {len(written['runs'])} TensorBoard runs of study {name} to "
            f"{written['directory']} (view: tensorboard --logdir {written['directory']})"
        )
        return
    summary = from_store("export", name, open_store().study_summary, results=False)
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


def versus_table(tests: dict, reference: str = "mesa") -> Group:
    """``reference`` (MESA) against each method over the triggers (``stats.summarize``'s
    ``wilcoxon``)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from engine.report.paper import pct

    title = f"Paired per trigger, {reference} minus each method: the triggers where the"
    title += " difference's 95 % interval lies below zero (lower) or above it (higher), its mean"
    title += " and median over the triggers and the signed-rank test"
    table = Table(box=None, header_style="bold", padding=(0, 1, 0, 0))
    for column in ("versus", "n", "lower", "higher", "mean", "median", "Wilcoxon p"):
        table.add_column(column, no_wrap=True)
    for method, test in tests.items():
        if test.get("p") is not None:
            row = (test["n"], test["lower"], test["higher"])
            row += (pct(test["mean_diff"]), pct(test["median_diff"]))
            table.add_row(method, *map(str, row), f"{test['p']:.2g}")
    return Group(Text(title, style="italic"), table)  # a title that wraps at the terminal's width


def show_results_folder(data: dict, json_output: bool) -> None:
    """The paper-figure study's result folder: per rate, each method's mean ASR with its bootstrap
    interval, the worst trigger, the triggers left above 10 % and the clean accuracy after repair
    (``report FOLDER`` has the rest)."""
    if json_output:
        print_json(data)
        return
    from rich.console import Console
    from rich.table import Table

    from engine.report.paper import pct

    def points(*values: float | None) -> str:  # percentages without the sign, for brackets
        return ", ".join("–" if v is None else f"{100 * v:.1f}" for v in values)

    def paper_cell(row: dict) -> str:
        return f"{points(row['mean'], row['worst']).replace(', ', ' / ')} %" if row else "–"

    console = Console()
    for rate, entry in data["rates"].items():
        main = " (main)" if float(rate) == data["main_rate"] else ""
        title = f"stamping rate {rate}{main}: ASR left after repair (mean, its 95 % interval, the"
        title += " worst trigger, triggers above 10 %), clean accuracy, the paper's mean / worst"
        table = Table(box=None, header_style="bold", title=title, padding=(0, 1, 0, 0))
        for column in ("method", "n", "asr", "[95 %]", "worst", "at", ">10%", "acc", "paper"):
            table.add_column(column, no_wrap=True)  # fits 80 columns with the longest names
        for method, m in entry.get("methods", {}).items():
            paper_row = data["paper"].get(method, {})
            table.add_row(
                method,
                str(m["n"]),
                pct(m["asr_mean"]["mean"]),
                f"[{points(m['asr_mean']['lo'], m['asr_mean']['hi'])}]",
                pct(m["worst"]["asr"]),
                m["worst"]["trigger"],
                str(m["above_threshold"]["count"]),
                pct(m["acc_clean_mean"]),  # a low ASR bought with accuracy is no repair
                paper_cell(paper_row),
            )
        console.print(table)
        console.print(versus_table(entry.get("wilcoxon", {})))
