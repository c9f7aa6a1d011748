"""Metric series kept on the UI side: appended from batches, downsampled to the pixels shown."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from mesa_tui.source import HISTORY_POINTS
from store.downsample import buckets_for
from store.entities import MetricHistory, MetricPoint


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

    def replace(self, steps: np.ndarray, values: np.ndarray) -> None:
        """Hold exactly these points (a history read from the store, or a compacted copy)."""
        size = max(64, len(steps))
        self._steps = np.empty(size, dtype=np.float64)
        self._values = np.empty(size, dtype=np.float64)
        self.n = len(steps)
        self._steps[: self.n] = steps
        self._values[: self.n] = values

    def compact(self, max_points: int) -> None:
        """Downsample in place to at most ``2 * max_points`` points (min and max per step range)."""
        if self.n > 2 * max_points:
            self.replace(*downsample(self.steps, self.values, max_points))


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
    """All series of one job (or one run): a downsampled history read once (``load_history``),
    then metric batches above an id cursor appended. A series that grows past ``COMPACT_FACTOR``
    times ``max_points`` is downsampled again to ``2 * max_points`` points (min and max per step
    range), so memory and redraws stay bounded however long a run streams. ``received`` counts
    the stored points the series stand for."""

    COMPACT_FACTOR = 4

    def __init__(self, max_points: int = HISTORY_POINTS) -> None:
        self.series: dict[str, Series] = {}
        self.cursor = 0
        self.version = 0
        self.received = 0
        self.max_points = max_points

    def _compact(self, keys: Iterable[str]) -> None:
        limit = self.COMPACT_FACTOR * self.max_points
        for key in keys:
            s = self.series[key]
            if s.n > limit:
                s.compact(self.max_points)

    def load_history(self, history: MetricHistory) -> bool:
        """Replace the series by a history read above nothing newer than the cursor; returns
        whether it applied (a history older than what is shown is skipped)."""
        if history.cursor <= self.cursor:
            return False
        self.series = {}
        for key, c in history.series.items():
            s = self.series[key] = Series()
            s.replace(np.asarray(c.steps, dtype=np.float64), np.asarray(c.values, dtype=np.float64))
        self._compact(list(self.series))
        self.cursor = history.cursor
        self.received = history.count
        self.version += 1
        return True

    def add(self, points: Iterable[MetricPoint]) -> int:
        """Apply points above the cursor (a repeated batch is skipped); returns how many."""
        added = 0
        touched = set()
        for p in points:
            if p.id <= self.cursor:
                continue
            self.series.setdefault(p.key, Series()).append(p.step, p.value)
            touched.add(p.key)
            self.cursor = p.id
            added += 1
        if added:
            self._compact(touched)
            self.received += added
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
        self._compact(batch.by_key)
        self.cursor = batch.last_id
        self.received += batch.count
        self.version += 1
        return batch.count

    def keys(self) -> list[str]:
        return sorted(self.series)


def downsample(x: np.ndarray, y: np.ndarray, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``2 * buckets`` points of a series with ascending steps ``x``: the first, the last
    and per step range the (earliest) minimum and maximum, in step order; NaN is never chosen.
    The same points as ``store.downsample.minmax`` (which the store uses), vectorised."""
    n = len(x)
    if buckets <= 0 or n <= 2 * buckets:
        return x, y
    if buckets == 1:
        return x[[0, n - 1]], y[[0, n - 1]]
    nb = buckets_for(buckets)
    lo, hi = x[0], x[-1]
    b = np.clip(((x - lo) * nb // (hi - lo + 1)).astype(np.int64), 0, nb - 1)
    starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
    ends = np.r_[starts[1:], n]
    nan = np.isnan(y)
    keep = [np.array([0, n - 1])]
    for fill, reduce in ((np.inf, np.minimum), (-np.inf, np.maximum)):
        key = np.where(nan, fill, y)
        best = np.repeat(reduce.reduceat(key, starts), ends - starts)
        hits = np.flatnonzero((key == best) & ~nan)
        if len(hits):  # the earliest hit of each bucket
            first = np.r_[True, b[hits[1:]] != b[hits[:-1]]]
            keep.append(hits[first])
    idx = np.unique(np.concatenate(keep))
    return x[idx], y[idx]
