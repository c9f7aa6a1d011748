"""Metric series kept on the UI side: appended from batches, downsampled to the pixels shown."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from mesa_tui.source import MetricPoint


class Series:
    """Steps and values of one metric key in growable arrays.

    A point whose step is not after the last one comes from a resumed attempt: the series is cut
    at that step and continues, so attempts join at the checkpoint step.
    """

    __slots__ = ("_steps", "_values", "n")

    def __init__(self) -> None:
        self._steps = np.empty(64, dtype=np.float64)
        self._values = np.empty(64, dtype=np.float64)
        self.n = 0

    def append(self, step: float, value: float) -> None:
        if self.n and step <= self._steps[self.n - 1]:
            self.n = int(np.searchsorted(self._steps[: self.n], step, side="left"))
        if self.n == len(self._steps):
            self._steps = np.resize(self._steps, 2 * self.n)
            self._values = np.resize(self._values, 2 * self.n)
        self._steps[self.n] = step
        self._values[self.n] = value
        self.n += 1

    def extend(self, steps: np.ndarray, values: np.ndarray) -> None:
        """Append many points at once (steps ascending), cutting at a resume like ``append``."""
        if len(steps) == 0:
            return
        if len(steps) > 1 and not np.all(np.diff(steps) > 0):
            for s, v in zip(steps.tolist(), values.tolist(), strict=True):
                self.append(s, v)
            return
        if self.n and steps[0] <= self._steps[self.n - 1]:
            self.n = int(np.searchsorted(self._steps[: self.n], steps[0], side="left"))
        need = self.n + len(steps)
        if need > len(self._steps):
            grow = max(need, 2 * len(self._steps))
            self._steps = np.resize(self._steps, grow)
            self._values = np.resize(self._values, grow)
        self._steps[self.n : need] = steps
        self._values[self.n : need] = values
        self.n = need

    @property
    def steps(self) -> np.ndarray:
        return self._steps[: self.n]

    @property
    def values(self) -> np.ndarray:
        return self._values[: self.n]

    def last(self) -> float | None:
        return float(self._values[self.n - 1]) if self.n else None


class MetricColumns:
    """Metric points grouped by key into arrays, built in a worker thread off the event loop."""

    __slots__ = ("by_key", "first_id", "last_id", "count", "_points")

    def __init__(self, points: list[MetricPoint]):
        self._points = points
        self.count = len(points)
        self.first_id = points[0].id if points else 0
        self.last_id = points[-1].id if points else 0
        grouped: dict[str, tuple[list[int], list[float]]] = {}
        for p in points:
            steps, values = grouped.setdefault(p.key, ([], []))
            steps.append(p.step)
            values.append(p.value)
        self.by_key = {
            k: (np.asarray(s, dtype=np.float64), np.asarray(v, dtype=np.float64))
            for k, (s, v) in grouped.items()
        }

    def points(self) -> list[MetricPoint]:
        return self._points


class SeriesSet:
    """All series of one job (or one run), fed by metric batches above an id cursor."""

    def __init__(self) -> None:
        self.series: dict[str, Series] = {}
        self.cursor = 0
        self.version = 0

    def add(self, points: Iterable[MetricPoint]) -> int:
        """Apply points above the cursor (a repeated batch is skipped); returns how many."""
        added = 0
        for p in points:
            if p.id <= self.cursor:
                continue
            self.series.setdefault(p.key, Series()).append(p.step, p.value)
            self.cursor = p.id
            added += 1
        if added:
            self.version += 1
        return added

    def add_columns(self, batch: MetricColumns) -> int:
        """Apply a batch grouped by key in the worker; vectorised unless it overlaps the cursor."""
        if batch.last_id <= self.cursor:
            return 0
        if batch.first_id <= self.cursor:
            return self.add(batch.points())
        for key, (steps, values) in batch.by_key.items():
            self.series.setdefault(key, Series()).extend(steps, values)
        self.cursor = batch.last_id
        self.version += 1
        return batch.count

    def keys(self) -> list[str]:
        return sorted(self.series)


def downsample(x: np.ndarray, y: np.ndarray, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``2 * buckets`` points: each bucket's minimum and maximum, in step order."""
    n = len(x)
    if buckets <= 0 or n <= 2 * buckets:
        return x, y
    width = -(-n // buckets)
    padded = np.full(buckets * width, np.nan)
    padded[:n] = y
    rows = padded.reshape(buckets, width)
    finite = np.isfinite(rows)
    lo = np.where(finite, rows, np.inf).argmin(axis=1)
    hi = np.where(finite, rows, -np.inf).argmax(axis=1)
    base = np.arange(buckets) * width
    first = base + np.minimum(lo, hi)
    second = base + np.maximum(lo, hi)
    idx = np.minimum(np.stack([first, second], axis=1).ravel(), n - 1)
    idx = idx[np.concatenate([[True], np.diff(idx) > 0])]
    return x[idx], y[idx]
