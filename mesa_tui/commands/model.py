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
        ...,
        help=".safetensors, a PyTorch checkpoint holding a state dict, or BackdoorBench's "
        "attack_result.pt",
    ),
    arch: str | None = typer.Option(
        None,
        "--arch",
        help="resnet18, preact-resnet18, vgg11-bn, small, small-wide (a BackdoorBench file "
        "names its own)",
    ),
    classes: int | None = typer.Option(
        None, "--classes", help="number of classes (a BackdoorBench file says it)"
    ),
    normalize: str | None = typer.Option(
        None,
        "--normalize",
        help="dataset whose normalisation the model expects, e.g. cifar10 (a BackdoorBench "
        "file names its dataset and brings BackdoorBench's normalisation)",
    ),
    channels: int | None = typer.Option(
        None, "--channels", help="input channels (default: the dataset's)"
    ),
    out: Path | None = typer.Option(
        None, "--out", help="artifact directory (default: under the data home)"
    ),
    json_output: bool = typer.Option(False, "--json"),
) -> None:
    """Import weights without running code from the file (``torch.load(weights_only=True)``,
    numpy arrays of plain dtypes allowed). A BackdoorBench attack result
    (``utils/save_load_attack.py``) brings its architecture, classes, dataset, normalisation and
    input size; a plain state dict needs --arch, --classes and --normalize."""
    from engine.ml.model_import import import_model

    info = import_model(
        path, arch=arch, classes=classes, normalize=normalize, channels=channels, out=out
    )
    if json_output:
        print_json(info)
    else:
        source = " (BackdoorBench attack result)" if info["source"] == "backdoorbench" else ""
        typer.echo(
            f"imported {path}{source} as a {info['arch']} model artifact of {info['classes']} "
            f"classes for {info['dataset']} -> {info['artifact']}"
        )


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
