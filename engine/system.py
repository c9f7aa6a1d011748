"""The engine host's CPU and memory and what each slot's child uses, for the heartbeat (the app's
system pane). psutil only: the engine never imports torch, and GPU figures come from NVML in
``engine.daemon.gpu_snapshot``. Without psutil the heartbeat carries no system figures."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

MB = 2**20


class SystemSampler:
    """Keeps the psutil process objects of the slots' children between heartbeats: a process's
    CPU share is measured from one call to the next, so the first reading of a child is 0."""

    def __init__(self) -> None:
        self.psutil: Any = None  # the module, or None where psutil is not installed
        try:
            import psutil
        except ImportError:
            return
        self.psutil = psutil
        self.processes: dict[int, Any] = {}
        psutil.cpu_percent(None)  # starts the host's interval

    def snapshot(
        self, slots: Iterable[tuple[int, str | None, int | None, int | None]]
    ) -> dict[str, Any] | None:
        """``slots``: (slot index, its GPU, the job running there, its child's pid) per slot."""
        if self.psutil is None:
            return None
        memory = self.psutil.virtual_memory()
        out = {
            "cpus": self.psutil.cpu_count() or 1,
            "cpu_pct": self.psutil.cpu_percent(None),
            "mem_used_mb": (memory.total - memory.available) / MB,
            "mem_total_mb": memory.total / MB,
            "slots": [],
        }
        alive = set()
        for index, gpu, job_id, pid in slots:
            entry: dict[str, Any] = {"slot": index, "gpu": gpu, "job_id": job_id}
            if pid is not None:
                entry.update(self._child(pid))
                alive.add(pid)
            out["slots"].append(entry)
        for pid in set(self.processes) - alive:
            del self.processes[pid]
        return out

    def _child(self, pid: int) -> dict[str, float]:
        """CPU (percent of one core) and resident memory of a child and its own children."""
        psutil = self.psutil
        assert psutil is not None, "snapshot reads children only with psutil"
        try:
            process = self.processes.get(pid)
            if process is None:
                process = self.processes[pid] = psutil.Process(pid)
            tree = [process, *process.children(recursive=True)]
            cpu = rss = 0.0
            for p in tree:
                cpu += p.cpu_percent(None) if p is not process else process.cpu_percent(None)
                rss += p.memory_info().rss
            return {"cpu_pct": cpu, "rss_mb": rss / MB}
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            self.processes.pop(pid, None)
            return {}
