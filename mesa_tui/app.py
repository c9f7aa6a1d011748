"""The terminal app: ``mesa-tui`` with no arguments.

The data source is injected (``create_app``), so the CLI runs the app over the store and the tests
run the same app over a scripted ``mesa_tui.demo.FakeSource`` with a frozen clock. Every store
call happens in a thread worker; widgets only ever see the messages those workers post.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from textual.app import App
from textual.binding import Binding
from textual.screen import Screen

from mesa_tui.messages import RequestDone
from mesa_tui.screens.compare import CompareScreen
from mesa_tui.screens.jobs import JobsScreen
from mesa_tui.screens.modals import HelpModal
from mesa_tui.screens.new import NewJobScreen
from mesa_tui.screens.run import RunScreen
from mesa_tui.screens.study import StudyScreen
from mesa_tui.source import DataSource, utc_now

THEMES = ("textual-dark", "textual-light")


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
    ) -> None:
        super().__init__()
        self.source = source
        self.clock = clock
        self.poll_s = poll_s
        self.metrics_poll_s = metrics_poll_s
        self.redraw_s = redraw_s
        self.theme = theme

    # -- navigation ---------------------------------------------------------------------------

    def open_job(self, job_id: int) -> None:
        self.push_screen(RunScreen(job_id))

    def open_new(self, kind: str | None = None) -> None:
        self.push_screen(NewJobScreen(kind))

    def job_kinds(self) -> list[str]:
        from engine.specs import SPEC_CLASSES

        return list(SPEC_CLASSES)

    def action_help(self) -> None:
        """The keys of this screen and the app first, then those of the focused widget."""
        if isinstance(self.screen, HelpModal):
            return
        own: list[tuple[str, str]] = []
        widget: list[tuple[str, str]] = []
        seen: set[tuple[str, str]] = set()
        for active in self.screen.active_bindings.values():
            row = (
                self.get_key_display(active.binding),
                active.binding.description or active.binding.action,
            )
            if row in seen:
                continue
            seen.add(row)
            (own if active.node in (self, self.screen) else widget).append(row)
        self.push_screen(HelpModal(own + widget))

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
            elif action == "start_engine":
                detail = source.start_engine()
            elif action == "export_report":
                detail = f"report written to {source.export_report(kwargs['kind'], kwargs['key'])}"
            else:
                raise ValueError(f"unknown request {action!r}")
            screen.post_message(RequestDone(action, detail, ids))

        what = f"{action} job {job_id}" if job_id is not None else action.replace("_", " ")
        screen.run_worker(do, thread=True, exit_on_error=False, group="request", description=what)


def create_app(
    source: DataSource, clock: Callable[[], datetime] = utc_now, **options: Any
) -> MesaApp:
    """The one factory: the CLI and the tests build the app the same way."""
    return MesaApp(source, clock, **options)


def app_for_store(db_url: str | None = None) -> App:
    """The app over the store (``--db`` / ``MESA_TUI_DB`` / the default SQLite file), or, when the
    store cannot be used (damaged, unwritable, unreachable, another schema), the screen that
    says so in the CLI's words and exits with code 2."""
    from engine.errors import UserError
    from mesa_tui.screens.store_error import StoreErrorApp
    from mesa_tui.source import open_store_source

    try:
        return create_app(open_store_source(db_url))
    except UserError as exc:
        return StoreErrorApp(str(exc))


def run_app(db_url: str | None = None) -> int:
    """Run the app; its exit code (2 after a store it could not use)."""
    import sys

    from mesa_tui.screens.store_error import StoreErrorApp

    app = app_for_store(db_url)
    app.run()
    if isinstance(app, StoreErrorApp):
        # The screen is gone with the app: the line stays in the terminal, as from a command.
        print(f"error: {app.message}", file=sys.stderr)
    return app.return_code or 0
