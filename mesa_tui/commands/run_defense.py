"""``mesa-tui run mesa|detect|defend``: the MESA search, target-class detection and the defenses.

Each command's options are the fields of its spec (``model_options``). It validates the spec and
its model artifact before anything is written, then runs the task in the foreground (progress
bar, results table or ``--json``).
"""

from __future__ import annotations

import typer

from mesa_tui.commands.model_options import Given, spec_command
from mesa_tui.commands.run import app

JSON_OUTPUT = typer.Option(False, "--json", help="print one JSON object")


@spec_command(app, "mesa")
def mesa(given: Given, json_output: bool = JSON_OUTPUT) -> None:
    """Recover the distribution of triggers of a backdoored model (one generator per beta)."""
    from engine.tasks.mesa import check_spec
    from mesa_tui.foreground import run_foreground

    spec = given.spec("mesa")
    check_spec(spec)
    run_foreground("mesa", spec, json_output)


@spec_command(app, "detect")
def detect(given: Given, json_output: bool = JSON_OUTPUT) -> None:
    """Find the attacked class: a short search per class, flag classes full of valid triggers."""
    from engine.tasks.detect import check_spec
    from mesa_tui.foreground import run_foreground

    spec = given.spec("detect")
    check_spec(spec)
    run_foreground("detect", spec, json_output)


@spec_command(app, "defend")
def defend(given: Given, json_output: bool = JSON_OUTPUT) -> None:
    """Repair a backdoored model: fine-tune with stamped triggers that keep their true labels,
    or run one of the post-training defenses (anp, i-bau, clp, ft-sam)."""
    from engine.spec_fields import option_name
    from engine.specs import check_method_settings
    from engine.tasks.defend import check_spec
    from mesa_tui.foreground import run_foreground

    spec = given.spec("defend")
    check_method_settings([spec.method], {k: option_name(k) for k in given.values})
    check_spec(spec)
    run_foreground("defend", spec, json_output)
