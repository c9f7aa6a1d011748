"""What every screen shares: the data source, the clock, and one handler for failed workers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.screen import Screen
from textual.worker import Worker, WorkerState

if TYPE_CHECKING:
    from mesa_tui.app import MesaApp


def report_failed_worker(screen: Screen, event: Worker.StateChanged) -> None:
    """A failed store read or write becomes a notice (a store problem in the CLI's one line:
    a full disk, a server gone away, damage); the app keeps running."""
    if event.state is WorkerState.ERROR:
        error = event.worker.error
        store = getattr(getattr(screen.app, "source", None), "store", None)
        url = getattr(store, "url", None)
        if isinstance(url, str) and error is not None:
            from store.health import classify

            error = classify(error, url) or error
        screen.app.notify(
            f"{event.worker.description or event.worker.name}: {error}",
            title="store",
            severity="error",
            timeout=8,
        )


class SourceScreen(Screen):
    """A screen that reads the data source in thread workers."""

    @property
    def mesa(self) -> MesaApp:
        return self.app  # type: ignore[return-value]

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        report_failed_worker(self, event)
