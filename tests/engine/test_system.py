"""The heartbeat's system figures: the host's CPU and memory and each slot's child (psutil)."""

from __future__ import annotations

import os
import subprocess
import sys

from engine.system import SystemSampler


def test_the_snapshot_names_each_slot_and_what_its_child_uses():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        sampler = SystemSampler()
        slots = [(0, None, 7, child.pid), (1, "0", None, None)]
        first = sampler.snapshot(slots)
        assert first["cpus"] == os.cpu_count() and 0 < first["mem_used_mb"] < first["mem_total_mb"]
        busy, idle = first["slots"]
        assert (busy["slot"], busy["job_id"], idle["gpu"]) == (0, 7, "0")
        assert busy["rss_mb"] > 1 and busy["cpu_pct"] >= 0 and "rss_mb" not in idle
        child.kill()
        child.wait()
        gone = sampler.snapshot(slots)["slots"][0]
        assert "rss_mb" not in gone and child.pid not in sampler.processes  # a dead child: blank
    finally:
        child.kill()
        child.wait()
