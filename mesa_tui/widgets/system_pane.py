"""The system pane under the jobs table (``y``): per live engine its host's CPU and memory, then
per slot the job there, what its process uses, and the slot's GPU memory and utilisation, as
the engine's last heartbeat reported them."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from mesa_tui.source import EngineStatus
from store.entities import EngineInfo, GpuInfo, SlotLoad

COLUMNS = ("where", "job", "cpu", "memory", "gpu", "gpu mem", "util")  # fits 60 columns


def _gb(used: float | None, total: float | None = None) -> str:
    if used is None:
        return ""
    gb = used / 1024
    return (f"{gb:.1f}" if gb < 10 else f"{gb:.0f}") + (f"/{total / 1024:.0f}G" if total else "G")


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}%"


def engine_row(e: EngineInfo) -> tuple[object, ...]:
    system = e.system
    cpu = f"{_pct(system.cpu_pct)}/{system.cpus}" if system and system.cpus else "?"
    host = e.host if len(e.host) <= 12 else e.host[:11] + "…"
    return (
        Text(host, style="bold"),
        f"{e.slots_used}/{e.slots}",
        cpu,
        _gb(system.mem_used_mb, system.mem_total_mb) if system else "",
        "",
        "",
        "",
    )


def slot_row(s: SlotLoad, gpu_info: GpuInfo | None) -> tuple[object, ...]:
    """A slot's row; ``gpu_info`` is its GPU's NVML figures (``EngineInfo.slot_gpu``)."""
    if gpu_info is not None:
        gpu, mem = f"gpu{gpu_info.index}", _gb(gpu_info.memory_used_mb, gpu_info.memory_total_mb)
        util = _pct(gpu_info.utilization_pct)
    elif s.gpu is not None:  # a GPU slot whose heartbeat had no NVML figures
        gpu, mem, util = f"gpu{s.gpu}", "no NVML", ""
    else:
        gpu, mem, util = Text("none", style="dim"), "", ""
    return (
        f"  slot {s.slot}",
        str(s.job_id) if s.job_id is not None else Text("idle", style="dim"),
        _pct(s.cpu_pct),
        _gb(s.rss_mb),
        gpu,
        mem,
        util,
    )


def system_rows(status: EngineStatus | None) -> list[tuple[object, ...]]:
    if status is None or not status.alive:
        return [(Text("no engine running", style="bold red"), "", "", "", "", "", "")]
    rows: list[tuple[object, ...]] = []
    for engine in status.engines:
        rows.append(engine_row(engine))
        if engine.system is None:
            rows.append((Text("  no system figures: an engine without psutil", style="dim"),))
        else:
            rows += [slot_row(s, engine.slot_gpu(s)) for s in engine.system.slots]
    return [row + ("",) * (len(COLUMNS) - len(row)) for row in rows]


class SystemPane(DataTable):
    """Refilled only when the figures changed (the engine status is polled every second)."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="none", zebra_stripes=True, show_cursor=False)
        self.shown: list[tuple[object, ...]] | None = None

    def on_mount(self) -> None:
        self.add_columns(*COLUMNS)

    def show(self, status: EngineStatus | None) -> None:
        rows = system_rows(status)
        if rows == self.shown:
            return
        self.shown = rows
        self.clear()
        for row in rows:
            self.add_row(*row)
