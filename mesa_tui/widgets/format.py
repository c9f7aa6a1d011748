"""Small text formatters shared by the widgets (status colours, sparklines, sizes, times)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from rich.text import Text

# Rich styles (cells of a DataTable are rich renderables, not CSS).
STATUS_RICH = {
    "queued": "bold bright_black",
    "running": "bold cyan",
    "succeeded": "bold green",
    "failed": "bold red",
    "cancelled": "bold yellow",
    "lost": "bold magenta",
}
SPARK = "▁▂▃▄▅▆▇█"


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_RICH.get(status, ""))


def sparkline(values: Sequence[float], width: int = 12) -> str:
    """The last ``width`` values as block characters scaled to their own range."""
    tail = [v for v in values[-width:] if v == v]
    if not tail:
        return ""
    lo, hi = min(tail), max(tail)
    span = hi - lo or 1.0
    return "".join(
        SPARK[min(len(SPARK) - 1, int((v - lo) / span * (len(SPARK) - 1) + 0.5))] for v in tail
    )


def pct(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{100 * value:.{digits}f}%"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def size(n: int | None) -> str:
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def ago(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "never"
    return duration((now - when).total_seconds()) + " ago"


def number(value: float | None) -> str:
    if value is None:
        return ""
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.3e}"
    return f"{value:.4g}"
