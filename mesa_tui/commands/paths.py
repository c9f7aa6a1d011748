"""``mesa-tui paths``: where the store, artifacts, datasets, caches and logs live."""

from __future__ import annotations

import typer

from mesa_tui.commands.common import cli_errors, print_json


def paths_command(
    json_output: bool = typer.Option(False, "--json", help="one JSON object"),
) -> None:
    """Print where everything lives (MESA_TUI_HOME, XDG_DATA_HOME / XDG_CACHE_HOME /
    XDG_CONFIG_HOME and --db move it)."""
    from engine import paths
    from mesa_tui.config import config_path

    where = {
        "store": paths.default_db_url(),
        "data": str(paths.data_home()),
        "artifacts": str(paths.artifacts_dir()),
        "datasets": str(paths.datasets_dir()),
        "logs": str(paths.data_home() / "logs"),
        "cache": str(paths.cache_home()),
        "dataset_cache": str(paths.dataset_cache_dir()),
        "app_config": str(config_path()),
    }
    if json_output:
        print_json(where)
        return
    width = max(map(len, where))
    for key, value in where.items():
        typer.echo(f"{key:<{width}}  {value}")


def register(app: typer.Typer) -> None:
    app.command("paths")(cli_errors(paths_command))
