"""The terminal app: ``mesa-tui`` with no arguments.

The data source is injected (``create_app``), so the CLI runs the app over the store and the tests
run the same app over a scripted ``mesa_tui.demo.FakeSource`` with a frozen clock. Every store
call happens in a thread worker; widgets only ever see the messages those workers post.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from textual import events
from textual.app import App
from textual.binding import Binding
from textual.screen import Screen
from textual.scrollbar import ScrollBar, ScrollBarRender

from mesa_tui.config import AppConfig
from mesa_tui.messages import RequestDone
from mesa_tui.screens.compare import CompareScreen
from mesa_tui.screens.jobs import JobsScreen
from mesa_tui.screens.modals import HelpModal
from mesa_tui.screens.new import NewJobScreen
from mesa_tui.screens.run import RunScreen
from mesa_tui.screens.study import StudyScreen
from mesa_tui.source import DataSource, utc_now

THEMES = ("textual-dark", "textual-light")


class WholeCellScrollBar(ScrollBarRender):
    """Scroll-bar thumbs of whole cells: Textual draws a thumb's ends with eighth blocks
    (▁▂▃ ▇, ▉▊▋ ▎), which read as data beside a table or a plot (the stray ▇▇ of the help
    dialog); a thumb a fraction of a cell off is not worth that."""

    VERTICAL_BARS: ClassVar[list[str]] = [" "] * 8
    HORIZONTAL_BARS: ClassVar[list[str]] = [" "] * 8


ScrollBar.renderer = WholeCellScrollBar  # Textual's documented hook, for every scroll bar


class MesaApp(App):
    """Jobs, study and compare are modes (top-level views); run and new are pushed on top."""

    TITLE = "mesa-tui"
    CSS_PATH = "app.tcss"
    ENABLE_COMMAND_PALETTE = True
    MODES = {"jobs": JobsScreen, "study": StudyScreen, "compare": CompareScreen}
    DEFAULT_MODE = "jobs"
    BINDINGS = [
        Binding("q", "quit", "quit"),
        Binding("question_mark", "help", "help"),
        Binding("j", "switch_mode('jobs')", "jobs", show=False),
        Binding("s", "switch_mode('study')", "study", show=False),
        Binding("m", "switch_mode('compare')", "compare", show=False),
        Binding("ctrl+t", "toggle_theme", "theme", show=False),
    ]

    def __init__(
        self,
        source: DataSource,
        clock: Callable[[], datetime] = utc_now,
        *,
        poll_s: float = 1.0,
        metrics_poll_s: float = 0.5,
        redraw_s: float = 0.5,
        theme: str = "textual-dark",
        quiet_gc: bool = False,
        config: AppConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config if config is not None else AppConfig()  # in memory unless loaded
        self.quiet_gc = quiet_gc  # the real app and the benchmark; tests share one process
        self._gc = QuietCollector()
        self.source = source
        self.clock = clock
        self.poll_s = poll_s
        self.metrics_poll_s = metrics_poll_s
        self.redraw_s = redraw_s
        self.theme = theme
        self.pins: list[int] = []  # jobs overlaid on every run's curves and chosen in compare
        self.job_colours: dict[int, str] = {}

    def on_mount(self) -> None:
        if self.config.problem:
            self.notify(self.config.problem, severity="warning", timeout=10)
        if self.quiet_gc:
            self.call_after_refresh(self._gc.start)
            self.set_interval(FULL_GC_EVERY_S, self._gc.collect_if_idle)

    def on_unmount(self) -> None:
        if self.quiet_gc:
            self._gc.stop()

    async def on_event(self, event: events.Event) -> None:
        if isinstance(event, events.Key | events.MouseDown):
            self._gc.last_input = time.monotonic()
        await super().on_event(event)

    # -- pinned runs ----------------------------------------------------------------------------

    def colour_of(self, job_id: int) -> str:
        """A job's colour, the same on every screen for as long as the app runs."""
        from mesa_tui.widgets.curves import PALETTE

        if job_id not in self.job_colours:
            self.job_colours[job_id] = PALETTE[len(self.job_colours) % len(PALETTE)]
        return self.job_colours[job_id]

    def toggle_pin(self, job_id: int) -> bool:
        """Pin or unpin a job; returns whether it is pinned now."""
        if job_id in self.pins:
            self.pins.remove(job_id)
            return False
        self.pins.append(job_id)
        self.colour_of(job_id)
        return True

    # -- navigation ---------------------------------------------------------------------------

    def open_job(self, job_id: int) -> None:
        self.push_screen(RunScreen(job_id))

    def open_new(self, kind: str | None = None) -> None:
        self.push_screen(NewJobScreen(kind))

    def job_kinds(self) -> list[str]:
        from engine.specs import SPEC_CLASSES

        return list(SPEC_CLASSES)

    def action_help(self) -> None:
        """The keys of this screen and the app first, then those of the focused widget; keys
        that do the same (q and ctrl+q quit) share a row."""
        if isinstance(self.screen, HelpModal):
            return
        rows: dict[str, tuple[bool, str, list[str]]] = {}  # by what it does, any case
        for active in self.screen.active_bindings.values():
            key = self.get_key_display(active.binding)
            description = active.binding.description or active.binding.action
            own = active.node in (self, self.screen)
            first_own, _, keys = rows.get(description.lower(), (own, description, []))
            if key not in keys:
                keys.append(key)
            # A subclass's words come after Textual's ("quit" after "Quit"): the later wins.
            rows[description.lower()] = (first_own, description, keys)
        ordered = sorted(rows.values(), key=lambda row: not row[0])  # stable: own rows first
        self.push_screen(HelpModal([(", ".join(keys), does) for _, does, keys in ordered]))

    def action_toggle_theme(self) -> None:
        self.theme = (
            THEMES[(THEMES.index(self.theme) + 1) % 2] if self.theme in THEMES else THEMES[0]
        )

    # -- write requests -----------------------------------------------------------------------

    def send_request(self, screen: Screen, action: str, job_id: int | None, **kwargs: Any) -> None:
        """Run one write request in a thread worker on ``screen``; it answers with RequestDone."""
        source = self.source

        def do() -> None:
            ids: tuple[int, ...] = ()
            if action == "cancel":
                source.cancel(job_id)  # type: ignore[arg-type]
                detail = f"cancel requested for job {job_id}"
            elif action == "retry":
                ids = (source.retry(job_id),)  # type: ignore[arg-type]
                detail = f"job {ids[0]} queued again"
            elif action == "delete":
                source.delete(job_id)  # type: ignore[arg-type]
                detail = f"job {job_id} deleted"
            elif action == "submit":
                spec: Mapping[str, Any] = kwargs["spec"]
                ids = tuple(source.submit(kwargs["kind"], spec, kwargs.get("study")))
                detail = f"submitted {kwargs['kind']} job{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}"
            elif action == "annotate":
                row = source.annotate(job_id, kwargs["note"], kwargs["tags"])  # type: ignore[arg-type]
                words = " ".join(f"#{t}" for t in row.tags)
                detail = f"job {job_id}: {words + ' ' if words else ''}{row.note or '(no note)'}"
            elif action == "start_engine":
                detail = source.start_engine()
            elif action == "export_report":
                detail = f"report written to {source.export_report(kwargs['kind'], kwargs['key'])}"
            else:
                raise ValueError(f"unknown request {action!r}")
            screen.post_message(RequestDone(action, detail, ids))

        what = f"{action} job {job_id}" if job_id is not None else action.replace("_", " ")
        screen.run_worker(do, thread=True, exit_on_error=False, group="request", description=what)


FULL_GC_EVERY_S = 20.0  # a full garbage collection at most this often, between key presses
QUIET_S = 1.0  # no key or click for this long: a collection now delays no one


class QuietCollector:
    """Full garbage collections only while the user is not typing.

    A full collection walks every tracked object with the event loop stopped: with a large heap
    one took 600 ms, and those were the slowest key presses of
    ``benchmarks/tui_responsiveness.py --profile``. At start everything alive (modules, Textual's
    and the store's structures, a data source's caches, all living as long as the app) is frozen
    out of the collector's reach; afterwards the young generations are collected as usual, and
    the old one on a timer when no key was pressed for ``QUIET_S``.
    """

    def __init__(self) -> None:
        self.last_input = 0.0
        self.thresholds: tuple[int, int, int] | None = None

    def start(self) -> None:
        gc.collect()
        gc.freeze()
        self.thresholds = gc.get_threshold()
        young, middle, _ = self.thresholds
        gc.set_threshold(young, middle, 1_000_000_000)  # the old generation: never by itself

    def collect_if_idle(self) -> None:
        if time.monotonic() - self.last_input >= QUIET_S:
            gc.collect()

    def stop(self) -> None:
        if self.thresholds is not None:
            gc.set_threshold(*self.thresholds)
            gc.unfreeze()
            self.thresholds = None


def create_app(
    source: DataSource, clock: Callable[[], datetime] = utc_now, **options: Any
) -> MesaApp:
    """The one factory: the CLI and the tests build the app the same way."""
    return MesaApp(source, clock, **options)


def app_for_store(db_url: str | None = None, results: Sequence[Path] = ()) -> App:
    """The app over the store (``--db`` / ``MESA_TUI_DB`` / the default SQLite file), or, when the
    store cannot be used (damaged, unwritable, unreachable, another schema), the screen that
    says so in the CLI's words and exits with code 2."""
    from engine.errors import UserError
    from mesa_tui.screens.store_error import StoreErrorApp
    from mesa_tui.source import open_store_source

    try:
        source = open_store_source(db_url, results)
        return create_app(source, quiet_gc=True, config=AppConfig.load())
    except UserError as exc:
        return StoreErrorApp(str(exc))


def run_app(db_url: str | None = None, results: Sequence[Path] = ()) -> int:
    """Run the app; its exit code (2 after a store it could not use)."""
    import sys

    from mesa_tui.screens.store_error import StoreErrorApp

    app = app_for_store(db_url, results)
    app.run()
    if isinstance(app, StoreErrorApp):
        # The screen is gone with the app: the line stays in the terminal, as from a command.
        print(f"error: {app.message}", file=sys.stderr)
    return app.return_code or 0
