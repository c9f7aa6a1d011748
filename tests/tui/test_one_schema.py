"""The specs are the one schema: a field added to a spec is an option of `run` and `submit`
(help, default, validation) and a field of the new-job form, with no other edit."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from textual.widgets import Input, Select
from typer.testing import CliRunner

from engine import specs
from mesa_tui.cli import app as cli
from mesa_tui.screens.new import NewJobScreen

from .conftest import make_app, settle


class WarmDefendSpec(specs.DefendSpec):
    warmup_epochs: int = Field(2, ge=0, description="epochs before the stamping starts")
    warmup_shape: Literal["flat", "linear"] = Field("flat", description="how the rate rises")


async def test_a_field_added_to_a_spec_reaches_run_submit_and_the_form(demo, clock, monkeypatch):
    monkeypatch.setitem(specs.SPEC_CLASSES, "defend", WarmDefendSpec)
    runner = CliRunner()
    for command in (["run", "defend"], ["submit", "defend"]):
        shown = runner.invoke(cli, [*command, "--help"], env={"COLUMNS": "250"})
        assert shown.exit_code == 0, shown.output
        for text in ("--warmup-epochs", "epochs before the stamping starts (default: 2)"):
            assert text in shown.stdout, (command, text)
        assert "[flat|linear]" in shown.stdout
        bad = runner.invoke(cli, [*command, "--model", "m", "--warmup-epochs=-1"])
        assert bad.exit_code == 2
        assert bad.stderr.strip().startswith("error: invalid --warmup-epochs -1:"), bad.stderr
    app = make_app(demo, clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        app.push_screen(NewJobScreen(kind="defend"))
        await settle(pilot)
        assert app.screen.query_one("#f-warmup_epochs", Input).value == "2"
        assert app.screen.query_one("#f-warmup_shape", Select).value == "flat"
