"""The ``mesa-tui`` command: no arguments opens the Textual app; subcommands run headless.

Heavy modules (torch, textual, sqlalchemy) are imported inside the commands that need them, so
``mesa-tui --help`` answers at once. Exit codes: 0 success, 1 a job or task failed, 2 bad input
(one line on stderr naming the value and the fix), 130 interrupted.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from mesa_tui.commands import data as data_cmd
from mesa_tui.commands import db as db_cmd
from mesa_tui.commands import engine_control, jobs, paths, study, submit
from mesa_tui.commands import model as model_cmd
from mesa_tui.commands import report as report_cmd
from mesa_tui.commands import run as run_cmd
from mesa_tui.commands.common import cli_errors

app = typer.Typer(
    name="mesa-tui",
    help="MESA backdoor trigger-distribution recovery and defenses, with a terminal experiment manager.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# Foreground runs and data, then jobs, the engine, studies, the store and reports.
app.add_typer(run_cmd.app, name="run")
app.add_typer(data_cmd.app, name="data")
app.add_typer(model_cmd.app, name="model")
app.add_typer(submit.app, name="submit")
jobs.register(app)
app.add_typer(engine_control.app, name="engine")
app.add_typer(study.app, name="study")
app.add_typer(db_cmd.app, name="db")
paths.register(app)
report_cmd.register(app)


@app.callback(invoke_without_command=True)
@cli_errors
def main_callback(
    ctx: typer.Context,
    db: str | None = typer.Option(
        None, "--db", envvar="MESA_TUI_DB", help="store URL (default: SQLite in the data home)"
    ),
    results: list[Path] = typer.Option(
        [],
        "--results",
        help="the app's study screen also lists this result folder of benchmarks/paper_study.py "
        "(e.g. docs/results/paper-small), one entry per stamping rate; repeatable",
    ),
) -> None:
    """Without a command, open the terminal app."""
    if db:
        os.environ["MESA_TUI_DB"] = db
    if results and ctx.invoked_subcommand is not None:
        from engine.errors import UserError

        raise UserError(
            "--results is for the app; give it without a command: mesa-tui --results DIR"
        )
    if ctx.invoked_subcommand is None:
        from mesa_tui.commands.common import open_app

        open_app(results)


def main() -> None:
    from engine.errors import UserError

    try:
        app()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as exc:
        from mesa_tui.commands.common import store_problem

        problem = store_problem(exc)
        if problem is None:
            raise
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
