"""The curves widget: a plot per metric (or per beta) on its own scale, a filter over hundreds of
series, pinned runs overlaid in colours that stay, pages instead of scroll bars, no empty plot."""

from __future__ import annotations

from textual.widgets import Input
from textual_plot import PlotWidget

from mesa_tui.demo import FakeSource
from mesa_tui.screens.run import RunScreen
from mesa_tui.widgets.curves import CurvesPanel, group_of, line_label, matches

from .conftest import make_app, refresh_screen, settle

BETAS = ("0.9", "0.5")


def search_job(source: FakeSource, extras: int = 0) -> int:
    """A search whose validity is near 1 and whose k-NN entropy is near -150."""
    job = source.add_job("mesa", "running", spec={"kind": "mesa", "trigger": "bw:1"})
    run = source.run_ids(job)[0]
    for step in range(1, 30):
        values = {"train/loss": 1 / step}
        for beta in BETAS:
            values[f"mesa/beta={beta}/hinge"] = 0.1 * step
            values[f"mesa/beta={beta}/validity"] = 0.9 + 0.001 * step
            values[f"mesa/beta={beta}/knn_entropy"] = -150.0 - step
            for extra in range(extras):
                values[f"mesa/beta={beta}/extra{extra}"] = float(extra)
        source.log_metrics(run, step, values)
    return job


def y_ranges(panel) -> list[tuple[float, float]]:
    plot = panel.query_one(PlotWidget)
    return [(float(min(d.y)), float(max(d.y))) for d in plot._datasets]


async def open_curves(pilot, job: int) -> tuple[RunScreen, CurvesPanel]:
    pilot.app.open_job(job)
    await refresh_screen(pilot)
    run = pilot.app.screen
    run.redraw()
    await settle(pilot, 1)
    return run, run.query_one(CurvesPanel)


async def choose(pilot, panel: CurvesPanel, pattern: str) -> None:
    """Type a filter and press enter: exactly the matching series are chosen."""
    panel.query_one("#series-filter", Input).value = pattern
    panel.query_one("#series-filter", Input).focus()
    await pilot.press("enter")
    await settle(pilot, 1)


def test_groups_labels_and_the_filter():
    assert group_of("mesa/beta=0.9/validity", "metric") == "validity"
    assert group_of("train/loss", "metric") == "loss"
    assert group_of("mesa/beta=0.9/validity", "beta") == "β=0.9"
    assert group_of("eval/asr", "beta") == "eval"
    assert line_label("mesa/beta=0.9/validity", "validity") == "β=0.9"
    assert line_label("repair/loss", "loss") == "repair"
    assert matches("mesa/beta=0.9/knn_entropy", "β=0.9 knn")  # the chooser's short form
    assert matches("mesa/beta=0.9/validity", "*VALIDITY") and not matches("train/loss", "val*")


async def test_validity_and_entropy_get_plots_of_their_own(clock):
    source = FakeSource(clock)
    job = search_job(source)
    app = make_app(source, clock)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        run, panel = await open_curves(pilot, job)
        await choose(pilot, panel, "validity")
        assert panel.selected() == {f"mesa/beta={b}/validity" for b in BETAS}
        await choose(pilot, panel, "beta=0.9")
        panels = panel.panels()
        assert set(panels) == {"hinge", "validity", "knn_entropy"}
        assert all(0.9 <= lo <= hi <= 1.0 for lo, hi in y_ranges(panels["validity"]))
        assert all(hi <= -150 for _, hi in y_ranges(panels["knn_entropy"]))
        assert all(y_ranges(p) for p in panels.values())  # no empty plot
        await pilot.press("g")  # by beta: the one β=0.9 plot
        run.redraw()
        await settle(pilot, 1)
        assert set(panel.panels()) == {"β=0.9"}


async def test_hundreds_of_series_turn_pages_instead_of_scrolling(clock):
    source = FakeSource(clock)
    job = search_job(source, extras=60)  # 3 + 60 series per beta
    app = make_app(source, clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        run, panel = await open_curves(pilot, job)
        assert len(panel.key_colours) == 1 + 2 * 63
        await choose(pilot, panel, "*beta=0.5*")
        assert len(panel.selected()) == 63 and panel.pages > 1
        first = set(panel.panels())
        run.focus()
        await pilot.press("full_stop")
        await settle(pilot, 1)
        assert panel.page == 1 and set(panel.panels()).isdisjoint(first)
        assert all(p.region.bottom <= panel.region.bottom for p in panel.panels().values())


async def test_a_pinned_run_is_overlaid_in_its_own_colour(clock):
    source = FakeSource(clock)
    first, second = search_job(source), search_job(source)
    app = make_app(source, clock)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        run, panel = await open_curves(pilot, first)
        await pilot.press("p")  # pin the first search, then open the second
        await pilot.press("escape")
        await settle(pilot)
        run, panel = await open_curves(pilot, second)
        await refresh_screen(pilot)
        assert set(run.pinned) == {first}
        loss = panel.panels()["train/loss"]
        assert [(label, colour) for label, *_, colour in loss.lines] == [
            (f"job {second}", app.colour_of(second)),
            (f"job {first}", app.colour_of(first)),
        ]
        assert app.colour_of(first) != app.colour_of(second)


def test_a_repairs_curves_shown_first_are_keys_the_repair_logs():
    """Each default pattern names series a task writes (engine/ml/repair.py, train, mesa): a
    renamed key would otherwise leave the pane empty by default."""
    from mesa_tui.widgets.curves import shown_by_default

    repair = ["repair/loss", "repair/stamped", "repair/lr", "eval/asr", "eval/acc_clean", "eval/ra"]
    assert [k for k in repair if shown_by_default(k)] == [
        "repair/loss",
        "eval/asr",
        "eval/acc_clean",
    ]
    assert shown_by_default("mesa/beta=0.9/hinge") and shown_by_default("train/loss")
