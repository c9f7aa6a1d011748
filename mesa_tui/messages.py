"""Messages that thread workers post to the UI: tiny dataclasses, one per kind of result.

"Latest status" messages (engine status, job detail) may replace an older unhandled one of the
same kind (``can_replace``); incremental data (job deltas, metric batches, log lines) never do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from textual.message import Message

from mesa_tui.source import (
    EngineStatus,
    Grid,
    JobQuery,
    JobsPage,
    JobView,
    TriggerSamples,
)
from mesa_tui.widgets.series import MetricColumns
from store.entities import LogEntry, MetricHistory


@dataclass
class JobsPolled(Message):
    """A delta of the jobs table; applying it twice is harmless (upsert by id)."""

    page: JobsPage
    query: JobQuery  # the filter it was read with; a stale filter's answer is ignored


@dataclass
class EngineStatusPolled(Message):
    status: EngineStatus

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, EngineStatusPolled)


@dataclass
class JobDetailLoaded(Message):
    detail: JobView

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, JobDetailLoaded) and message.detail.job.id == self.detail.job.id


@dataclass
class MetricsBatch(Message):
    """New metric points above a cursor, grouped by key; never coalesced, never dropped."""

    job_id: int
    columns: MetricColumns


@dataclass
class MetricsHistory(Message):
    """A job's series read once, downsampled in the store; batches above its cursor follow."""

    job_id: int
    history: MetricHistory


@dataclass
class LogBatch(Message):
    job_id: int
    lines: list[LogEntry]


@dataclass
class SamplesLoaded(Message):
    job_id: int
    samples: TriggerSamples
    embedding: dict[str, np.ndarray]  # beta -> (N, 2) PCA coordinates


@dataclass
class StudyLoaded(Message):
    summary: Grid


@dataclass
class StudiesListed(Message):
    names: list[str]


@dataclass
class RequestDone(Message):
    """A write request (submit, cancel, retry, delete, start engine) finished."""

    action: str
    detail: str
    job_ids: tuple[int, ...] = ()
