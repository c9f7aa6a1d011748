"""``mesa-tui model import|show``: bring in foreign weights as a model artifact, inspect one."""

from __future__ import annotations

from pathlib import Path

import typer

from mesa_tui.commands.common import cli_errors, print_json

app = typer.Typer(help="Import and inspect model artifacts.", no_args_is_help=True)


@app.command("import")
@cli_errors
def import_(
    path: Path = typer.Argument(
        ..., help=".safetensors, or a PyTorch checkpoint holding a state dict"
    ),
    arch: str = typer.Option(
        ..., "--arch", help="resnet18, preact-resnet18, vgg11-bn, small, small-wide"
    ),
    classes: int = typer.Option(..., "--classes", help="number of classes"),
    normalize: str = typer.Option(
        ..., "--normalize", help="dataset whose normalisation the model expects (e.g. cifar10)"
    ),
    channels: int | None = typer.Option(
        None, "--channels", help="input channels (default: the dataset's)"
    ),
    out: Path | None = typer.Option(
        None, "--out", help="artifact directory (default: under the data home)"
    ),
    json_output: bool = typer.Option(False, "--json"),
) -> None:
    """Import weights without unpickling arbitrary objects (``torch.load(weights_only=True)``)."""
    from engine.ml.model_import import import_model

    info = import_model(
        path, arch=arch, classes=classes, normalize=normalize, channels=channels, out=out
    )
    if json_output:
        print_json(info)
    else:
        typer.echo(f"imported {path} as a {arch} model artifact -> {info['artifact']}")


@app.command("show")
@cli_errors
def show(
    artifact: Path = typer.Argument(..., help="a model artifact directory"),
    json_output: bool = typer.Option(False, "--json"),
) -> None:
    """Print a model artifact's manifest (hashes verified)."""
    import json

    from engine.ml.artifacts import read_manifest

    manifest = read_manifest(artifact)
    if json_output:
        print_json(manifest)
    else:
        typer.echo(
            json.dumps(
                {
                    k: manifest[k]
                    for k in ("kind", "meta", "metrics", "code_version")
                    if k in manifest
                },
                indent=2,
            )
        )
