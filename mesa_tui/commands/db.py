"""``mesa-tui db upgrade|check|backup``: the store's schema, its health and its backups."""

from __future__ import annotations

import shlex

import typer

from mesa_tui.commands.common import cli_errors, print_json

app = typer.Typer(help="The store: schema upgrades, checks and backups.", no_args_is_help=True)


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


SCHEMA_STATES = {
    "current": "current",
    "behind": "older than this mesa-tui's {head}: run `mesa-tui db upgrade`",
    "unknown": "unknown to this mesa-tui (newer?)",
    "empty": "none yet (an empty file: the next command creates the tables)",
    "foreign": "none (tables not made by mesa-tui)",
}


@app.command("check")
@cli_errors
def check(json_output: bool = typer.Option(False, "--json", help="one JSON object")) -> None:
    """Check the store: SQLite's header, its schema against this mesa-tui, and PRAGMA
    integrity_check (reads every page; safe while an engine runs). Exit 2 when something is
    wrong, with one line saying what to do."""
    from engine import paths
    from store.health import check_store

    report = check_store(paths.default_db_url())
    ok = report["problem"] is None
    if json_output:
        print_json({**report, "ok": ok})
    elif not report["exists"]:
        typer.echo(f"no store at {report['store']} yet; the first command that uses it makes it")
    else:
        size = f", {report['bytes'] / 2**20:.1f} MiB" if report["bytes"] is not None else ""
        typer.echo(f"store      {report['store']} ({report['dialect']}{size})")
        if report["schema_state"] is not None:
            state = SCHEMA_STATES[report["schema_state"]].format(head=report["head"])
            typer.echo(f"schema     {report['schema'] or '-'} ({state})")
        integrity = report["integrity"]
        if integrity == "ok" or integrity == []:
            shown = "ok" if report["dialect"] == "sqlite" else "not checked (the server's own)"
            typer.echo(f"integrity  {shown}")
        elif integrity is not None:
            count = f"{len(integrity)}" if len(integrity) < 20 else "20 or more"
            typer.echo(f"integrity  {count} problem(s), the first ones:")
            for line in integrity:
                typer.echo(f"  {line}")
    if not ok:
        if not json_output:
            typer.echo(f"error: {report['problem']}", err=True)
        raise typer.Exit(2)


@app.command("backup")
@cli_errors
def backup(
    path: str = typer.Argument(
        ...,
        help="the backup file (must not exist), or a directory (an existing one, or PATH/) to "
        "put a dated file in",
    ),
    json_output: bool = typer.Option(False, "--json", help="one JSON object"),
) -> None:
    """Copy the store with SQLite's online backup API; engines keep running and writing. The
    copy is checked (PRAGMA integrity_check) before it takes its name. For PostgreSQL, print
    the pg_dump command that does it."""
    from engine import paths
    from store import db as dbmod
    from store.health import backup_sqlite, pg_dump_command

    url = dbmod.check_url(paths.default_db_url())
    if not dbmod.is_sqlite(url):
        command = pg_dump_command(url, path)
        if json_output:
            print_json({"store": dbmod.safe_url(url), "command": command})
        else:
            typer.echo(
                "# a PostgreSQL store is backed up by the server's tools (the password comes "
                "from PGPASSWORD or ~/.pgpass; restore with pg_restore -d DB FILE):"
            )
            typer.echo(shlex.join(command))
        return
    done = backup_sqlite(url, path)
    if json_output:
        print_json(done)
    else:
        typer.echo(
            f"backup of {done['store']} written to {done['backup']} "
            f"({done['bytes'] / 2**20:.1f} MiB, schema {done['schema']}, integrity ok)"
        )
