"""Min/max downsampling of a metric series by step range, in plain Python (no numpy in the store).

A plot of ``W`` pixel columns needs at most two points per column: the lowest and the highest value
of the steps that column covers, in step order, so spikes survive. ``minmax`` keeps the first and
the last point and, per bucket of steps, the (earliest) minimum and maximum: at most
``2 * max_points`` points. The bucket of a step is ``(step - lo) * buckets // (hi - lo + 1)`` with
``buckets = max_points - 1``; the store's SQL uses the same integer formula, so reducing in SQL
and then here gives exactly the points that reducing here alone would give. NaN is never chosen as
a minimum or a maximum (it may still be the first or the last point); infinities are values.
"""

from __future__ import annotations

from collections.abc import Sequence


def buckets_for(max_points: int) -> int:
    """Interior buckets for at most ``2 * max_points`` points (two are the first and the last)."""
    return max(1, max_points - 1)


def minmax(
    steps: Sequence[float],
    values: Sequence[float],
    max_points: int,
    lo: float | None = None,
    hi: float | None = None,
) -> tuple[list, list]:
    """At most ``2 * max_points`` points of a series whose steps ascend (see the module).

    ``lo``/``hi`` are the series' first and last step when ``steps`` holds only candidates of a
    longer series (the SQL's per-bucket minima and maxima): the buckets are then those of the whole
    series, and the candidates are always reduced.
    """
    n = len(steps)
    if n == 0 or (lo is None and hi is None and n <= 2 * max(1, max_points)):
        return list(steps), list(values)
    if max_points <= 1:
        return [steps[0], steps[-1]], [values[0], values[-1]]
    lo = steps[0] if lo is None else lo
    hi = steps[-1] if hi is None else hi
    buckets = buckets_for(max_points)
    span = hi - lo + 1
    low: dict[int, int] = {}
    high: dict[int, int] = {}
    for i in range(n):
        v = values[i]
        if v != v:  # NaN
            continue
        b = min(buckets - 1, max(0, int((steps[i] - lo) * buckets // span)))
        j = low.get(b)
        if j is None:
            low[b] = high[b] = i
            continue
        if v < values[j]:
            low[b] = i
        if v > values[high[b]]:
            high[b] = i
    keep = sorted({0, n - 1, *low.values(), *high.values()})
    return [steps[i] for i in keep], [values[i] for i in keep]
