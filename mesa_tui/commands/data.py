"""``mesa-tui data import|ls``: bring datasets in (safely) and list what is available."""

from __future__ import annotations

from pathlib import Path

import typer

from mesa_tui.commands.common import cli_errors, print_json

app = typer.Typer(help="Import and list datasets.", no_args_is_help=True)


@app.command("import")
@cli_errors
def import_(
    source: Path = typer.Argument(
        ..., help="a directory or .tar/.tar.gz/.zip holding train/<class>/* and test/<class>/*"
    ),
    name: str = typer.Option(..., "--name", help="the name to load it by (e.g. cifar10)"),
    json_output: bool = typer.Option(False, "--json"),
) -> None:
    """Decode an image folder into the data home; archives are read without extracting them,
    and absolute paths, '..', links and device files refuse the whole archive."""
    from rich.console import Console
    from rich.progress import Progress

    from engine.ml.data import import_dataset

    console = Console(stderr=True)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"decoding {source.name}", total=None)
        info = import_dataset(
            source, name, lambda done, total: progress.update(task, completed=done, total=total)
        )
    if json_output:
        print_json(info)
    else:
        typer.echo(
            f"imported {info['name']}: {info['train']} train / {info['test']} test images, "
            f"{info['classes']} classes -> {info['path']}"
        )


@app.command("ls")
@cli_errors
def ls(json_output: bool = typer.Option(False, "--json")) -> None:
    """List imported and cached datasets, and the known ones not yet local."""
    from rich.console import Console
    from rich.table import Table

    from engine.catalog import list_datasets

    rows = list_datasets()
    if json_output:
        print_json({"datasets": rows})
        return
    table = Table(title="datasets")
    for col in ("name", "status", "classes", "train", "test", "shape", "sha256"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            *(
                str(r.get(c, ""))
                for c in ("name", "status", "classes", "train", "test", "shape", "sha256")
            )
        )
    Console().print(table)
