"""The four recent defenses in the app's new-job form: the defend form offers each method and
its own settings and refuses a setting out of range on the field; the pipeline form queues them."""

from __future__ import annotations

from textual.widgets import Input, Select, Static

from mesa_tui.screens.new import NewJobScreen

from .conftest import make_app, settle, submit_form, wait_until


async def open_form(pilot, app, kind: str) -> NewJobScreen:
    await settle(pilot)
    await pilot.press("n")
    await settle(pilot)
    form = app.screen
    assert isinstance(form, NewJobScreen)
    form.query_one("#kind", Select).value = kind
    await wait_until(pilot, lambda: "method" in form.editors or "methods" in form.editors)
    return form


async def test_defend_form_takes_ft_sam_and_refuses_its_radius_out_of_range(demo, clock):
    app = make_app(demo, clock)
    async with app.run_test(size=(100, 30)) as pilot:
        form = await open_form(pilot, app, "defend")
        method = form.query_one("#f-method", Select)
        assert {"anp", "i-bau", "clp", "ft-sam"} <= {str(v) for _, v in method._options}
        method.value = "ft-sam"
        form.query_one("#f-model", Input).value = "/tmp/m"
        rho = form.query_one("#f-sam_rho", Input)
        rho.value = "-1"
        error = form.query_one("#e-sam_rho", Static)
        await wait_until(pilot, lambda: error.has_class("shown"))
        assert "greater than 0" in str(error.render())
        rho.value = "0.5"
        kind, spec = await submit_form(pilot, form, demo)
        assert kind == "defend" and spec["method"] == "ft-sam" and spec["sam_rho"] == 0.5


async def test_pipeline_form_queues_the_recent_defenses(demo, clock):
    app = make_app(demo, clock)
    async with app.run_test(size=(100, 30)) as pilot:
        form = await open_form(pilot, app, "pipeline")
        form.editors["methods"].value = "anp,i-bau,clp,ft-sam"
        kind, spec = await submit_form(pilot, form, demo)
        assert kind == "pipeline" and spec["methods"] == "anp,i-bau,clp,ft-sam"
