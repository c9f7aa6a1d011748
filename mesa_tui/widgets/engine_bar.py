"""One line: is an engine alive, its slots, and the GPUs as its heartbeat reports them."""

from __future__ import annotations

from datetime import datetime

from rich.text import Text
from textual.widgets import Static

from mesa_tui.source import EngineStatus
from mesa_tui.widgets.format import ago


def engine_line(status: EngineStatus | None, now: datetime) -> Text:
    if status is None:
        return Text("engine: reading the store…", style="italic")
    if not status.alive:
        return Text.assemble(
            ("○ no engine running", "bold red"),
            (" · jobs wait in the queue · press ", ""),
            ("e", "bold"),
            (" to start one", ""),
        )
    parts = [
        ("● engine ", "bold green"),
        (f"{status.host or '?'}:{status.pid or '?'}", ""),
        (f" · slots {status.slots_busy}/{status.slots_total}", ""),
    ]
    for gpu in status.gpus:
        mem = (
            f"{gpu.memory_used_mb / 1024:.0f}/{gpu.memory_total_mb / 1024:.0f}G"
            if gpu.memory_used_mb is not None and gpu.memory_total_mb
            else "?G"
        )
        util = f" {gpu.utilization_pct:.0f}%" if gpu.utilization_pct is not None else ""
        parts.append((f" · gpu{gpu.index} {mem}{util}", ""))
    parts.append((f" · beat {ago(status.heartbeat_at, now)}", "dim"))
    return Text.assemble(*parts, no_wrap=True, overflow="ellipsis")


class EngineBar(Static):
    DEFAULT_CSS = """
    EngineBar { height: 1; padding: 0 1; background: $boost; }
    """

    def show(self, status: EngineStatus | None, now: datetime) -> None:
        line = engine_line(status, now)
        if line != getattr(self, "shown", None):
            self.shown = line
            self.update(line)
