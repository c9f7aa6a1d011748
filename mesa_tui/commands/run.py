"""``mesa-tui run ...``: foreground runs of one task, with a progress bar and a results table.

Each subcommand lives in its own module and registers itself on ``app``.
"""

from __future__ import annotations

import typer

app = typer.Typer(help="Run one task in the foreground (no engine needed).", no_args_is_help=True)

from mesa_tui.commands import run_defense, run_train  # noqa: E402,F401  (registers commands)
