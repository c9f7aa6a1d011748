"""What every screen shares: the data source, the clock, and one handler for failed workers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.screen import ModalScreen, Screen
from textual.worker import Worker, WorkerState

if TYPE_CHECKING:
    from mesa_tui.app import MesaApp


def report_failed_worker(screen: Screen, event: Worker.StateChanged) -> None:
    """A failed store read or write becomes a notice; the app keeps running."""
    if event.state is WorkerState.ERROR:
        screen.app.notify(
            f"{event.worker.description or event.worker.name}: {event.worker.error}",
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


class SourceModal(ModalScreen):
    @property
    def mesa(self) -> MesaApp:
        return self.app  # type: ignore[return-value]

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        report_failed_worker(self, event)
