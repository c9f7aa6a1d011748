"""The app over a scripted FakeSource on a frozen clock; timers slowed so only explicit polls run."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from pathlib import Path

import pytest
from textual.pilot import Pilot
from textual.worker import WorkerFailed

from mesa_tui.app import MesaApp, create_app
from mesa_tui.demo import FakeSource, FrozenClock, demo_source

SLOW = 3600.0  # timers effectively off: tests poll explicitly, so screens are deterministic


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


@pytest.fixture
def demo(tmp_path: Path, clock: FrozenClock) -> FakeSource:
    return demo_source(tmp_path / "demo", clock)


@pytest.fixture
def snapshot_demo(clock: FrozenClock, tmp_path_factory) -> FakeSource:
    return demo_source(tmp_path_factory.mktemp("snap") / "demo", clock)


def make_app(source: FakeSource, clock: FrozenClock, live: bool = False, **options) -> MesaApp:
    timing = {} if live else {"poll_s": SLOW, "metrics_poll_s": SLOW, "redraw_s": SLOW}
    return create_app(source, clock, **timing, **options)


async def settle(pilot: Pilot, rounds: int = 3) -> None:
    """Let the workers finish and their messages land (twice: a message may start a worker)."""
    for _ in range(rounds):
        with contextlib.suppress(WorkerFailed):  # the app shows it as a notice; tests check that
            await pilot.app.workers.wait_for_complete()
        await pilot.pause()


async def open_study_screen(pilot: Pilot):
    """From the started app, the study screen as the `s` key opens it."""
    from mesa_tui.screens.study import StudyScreen

    await settle(pilot)
    await pilot.press("s")
    await settle(pilot)
    assert isinstance(pilot.app.screen, StudyScreen)
    return pilot.app.screen


async def submit_form(pilot: Pilot, form, source: FakeSource) -> tuple[str, dict]:
    """Submit the new-job form once it is valid; back on the jobs screen, the (kind, spec) the
    source received."""
    from mesa_tui.screens.jobs import JobsScreen

    await wait_until(pilot, lambda: not form.errors and not form.validation_pending)
    await pilot.press("ctrl+s")
    await settle(pilot)
    assert isinstance(pilot.app.screen, JobsScreen)
    return next(c[1] for c in source.calls if c[0] == "submit")


async def refresh_screen(pilot: Pilot) -> None:
    """Run the current screen's poll and redraw now, as their timers would."""
    screen = pilot.app.screen
    if hasattr(screen, "poll"):
        screen.poll()
    await settle(pilot)
    if hasattr(screen, "redraw"):
        screen.redraw()
    await settle(pilot, 1)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests on a fresh event loop (Pilot needs one; no extra plugin)."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    asyncio.run(pyfuncitem.obj(**kwargs))
    return True


async def wait_until(pilot: Pilot, predicate, timeout: float = 10.0) -> None:
    """Pause until ``predicate()`` holds (work coalesced to the next refresh lands a frame later)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {predicate}")
        await pilot.pause(0.02)
