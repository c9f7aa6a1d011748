"""``mesa-tui run train``: the attack (or clean training) in the foreground. Its options are the
fields of ``engine.specs.TrainSpec`` (``model_options``)."""

from __future__ import annotations

import typer

from mesa_tui.commands.model_options import Given, spec_command
from mesa_tui.commands.run import app


@spec_command(app, "train")
def train(
    given: Given,
    json_output: bool = typer.Option(
        False, "--json", help="print one JSON object instead of tables"
    ),
) -> None:
    """Train a model, poisoned with a patch trigger (the attack) or clean."""
    from engine.specs import check_against_dataset
    from mesa_tui.foreground import run_foreground

    spec = given.spec("train")
    check_against_dataset(spec)
    run_foreground("train", spec, json_output)
