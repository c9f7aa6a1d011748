"""``mesa-tui db upgrade``: bring the store to this version's schema (alembic migrations)."""

from __future__ import annotations

import typer

from mesa_tui.commands.common import cli_errors, print_json

app = typer.Typer(help="The store's schema.", no_args_is_help=True)


@app.command("upgrade")
@cli_errors
def upgrade(json_output: bool = typer.Option(False, "--json", help="one JSON object")) -> None:
    """Migrate the store (``--db`` or the default SQLite file) to the newest schema."""
    from engine import paths
    from store.repository import upgrade as upgrade_store

    url = paths.default_db_url()
    before, after = upgrade_store(url)
    if json_output:
        print_json({"store": url, "from": before, "to": after})
    elif before == after:
        typer.echo(f"{url} is already at schema {after}")
    elif before is None:
        typer.echo(f"{url} created at schema {after}")
    else:
        typer.echo(f"{url} upgraded from schema {before} to {after}")
