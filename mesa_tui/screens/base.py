"""What every screen shares: the data source, the clock, and one handler for failed workers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.screen import Screen
from textual.worker import Worker, WorkerState

from mesa_tui.messages import MetricsBatch, MetricsHistory
from mesa_tui.source import HISTORY_POINTS, DataSource
from mesa_tui.widgets.series import MetricColumns

METRIC_PAGE = 10_000  # small pages keep each batch's handling short on the event loop

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


def read_series(
    screen: Screen,
    source: DataSource,
    job_id: int,
    runs: tuple[int, ...],
    cursor: int,
    with_history: bool,
    worker: Worker,
) -> None:
    """Post a job's series to ``screen`` (in a worker): its downsampled history first when asked
    (a few thousand values per series however long the run), then the points after it."""
    if with_history:
        history = source.metric_history(job_id, HISTORY_POINTS)
        screen.post_message(MetricsHistory(job_id, history))
        cursor = max(cursor, history.cursor)
    while runs and not worker.is_cancelled:
        points = source.metric_points(runs, cursor, METRIC_PAGE)
        if points:
            screen.post_message(MetricsBatch(job_id, MetricColumns(points)))
            cursor = points[-1].id
        if len(points) < METRIC_PAGE:
            break


class SourceScreen(Screen):
    """A screen that reads the data source in thread workers."""

    @property
    def mesa(self) -> MesaApp:
        return self.app  # type: ignore[return-value]

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        report_failed_worker(self, event)
