"""The CPU thread budget: the engine shares the cores out among its CPU slots, each child gets
its share through MESA_TUI_THREADS, and a value the person set wins.

Observed on the 2-core AMD EPYC VM: two benchmark processes side by side, each taking both
cores, ran a one-beta MESA search at about 1.35 s per step; with one thread each, one-beta
searches took 0.28 to 0.41 s per step, evaluations included (OpenMP threads spin while they
wait for each other).
"""

from __future__ import annotations

import io
import subprocess

import pytest

from engine import daemon
from engine.daemon import EngineConfig, make_slots
from engine.errors import UserError
from engine.executors.base import Launch, Slot
from engine.executors.local import LocalExecutor
from engine.run_environment import (
    COMPILE_ENV,
    CUDNN_BENCHMARK_ENV,
    MALLOC_ENV,
    THREADS_ENV,
    check_run_environment,
    compile_setting,
    cudnn_benchmark_setting,
    thread_budget,
    usable_cores,
)


def test_budget_is_every_core_unless_set(monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert thread_budget() == usable_cores() >= 1
    monkeypatch.setenv(THREADS_ENV, "3")
    assert thread_budget() == 3


@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_a_bad_budget_is_one_line_naming_it(monkeypatch, value):
    monkeypatch.setenv(THREADS_ENV, value)
    with pytest.raises(UserError, match=f"{THREADS_ENV}='{value}' is not a thread count"):
        thread_budget()


def test_the_gpu_switches_default_to_no_compile_and_cudnn_autotuning(monkeypatch):
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    monkeypatch.delenv(CUDNN_BENCHMARK_ENV, raising=False)
    assert compile_setting() is False and cudnn_benchmark_setting() is True
    monkeypatch.setenv(COMPILE_ENV, "1")
    monkeypatch.setenv(CUDNN_BENCHMARK_ENV, "0")
    assert compile_setting() is True and cudnn_benchmark_setting() is False
    monkeypatch.setenv(COMPILE_ENV, "yes")
    with pytest.raises(UserError, match=f"{COMPILE_ENV}='yes' is not a switch; set it to 1 or 0"):
        check_run_environment()


def test_configure_device_sets_cudnn_autotuning_on_cuda_only(monkeypatch):
    torch = pytest.importorskip("torch")
    from engine.ml.runtime import configure_device

    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        configure_device(torch.device("cpu"))
        assert torch.backends.cudnn.benchmark is False
        monkeypatch.delenv(CUDNN_BENCHMARK_ENV, raising=False)
        configure_device(torch.device("cuda"))  # a flag only: no GPU is touched
        assert torch.backends.cudnn.benchmark is True
        monkeypatch.setenv(CUDNN_BENCHMARK_ENV, "0")
        configure_device(torch.device("cuda"))
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before


def test_configure_threads_follows_the_budget(monkeypatch):
    torch = pytest.importorskip("torch")
    from engine.ml.runtime import configure_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv(THREADS_ENV, "1")
        configure_threads()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_slots_share_the_cores(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(daemon, "usable_cores", lambda: 4)
    assert [s.threads for s in make_slots(EngineConfig(cpu_slots=2))] == [2, 2]
    assert [s.threads for s in make_slots(EngineConfig(cpu_slots=3))] == [1, 1, 1]
    assert [s.threads for s in make_slots(EngineConfig(cpu_slots=8))] == [1] * 8
    assert [s.threads for s in make_slots(EngineConfig())] == [4]
    gpu = make_slots(EngineConfig(gpus=["0", "1"], slots_per_gpu=2))
    assert [s.threads for s in gpu] == [1, 1, 1, 1]


class _Child:
    def __init__(self, *args, env, **kwargs):
        _Child.env = env
        self.stdin = io.BytesIO()
        self.pid = 12345


def _launched_env(tmp_path, monkeypatch, slot: Slot) -> dict[str, str]:
    monkeypatch.setattr(subprocess, "Popen", _Child)
    launch = Launch(1, 1, 1, "train", {}, str(tmp_path / "w"), False)
    LocalExecutor(tmp_path / "logs").launch(launch, slot)
    return _Child.env


def test_the_child_gets_its_share_and_a_set_value_wins(tmp_path, monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    env = _launched_env(tmp_path, monkeypatch, Slot("cpu0", threads=1))
    assert env[THREADS_ENV] == "1" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert THREADS_ENV not in _launched_env(tmp_path, monkeypatch, Slot("cpu0"))
    monkeypatch.setenv(THREADS_ENV, "2")
    assert _launched_env(tmp_path, monkeypatch, Slot("cpu0", threads=1))[THREADS_ENV] == "2"


def test_cpu_name_is_the_model_name_of_proc_cpuinfo():
    from pathlib import Path

    from engine.ml.runtime import cpu_name

    names = [
        line.split(":", 1)[1].strip()
        for line in (
            Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
        )
        if line.startswith("model name")
    ]
    assert cpu_name() == (names[0] if names else cpu_name()) and cpu_name()


def _fresh_allocator(monkeypatch):
    from engine.ml import runtime

    monkeypatch.setattr(runtime, "_allocator_mode", "system")
    calls = []
    monkeypatch.setattr(runtime, "_keep_freed_memory", lambda: calls.append(1) or True)
    return runtime, calls


def test_the_allocator_keeps_freed_memory_unless_told_not_to(monkeypatch):
    runtime, calls = _fresh_allocator(monkeypatch)
    monkeypatch.setenv(MALLOC_ENV, "system")
    assert runtime.configure_allocator() == "system" and calls == []
    assert runtime.allocator_mode() == "system"
    monkeypatch.delenv(MALLOC_ENV)
    assert runtime.configure_allocator() == "keep" and calls == [1]
    assert runtime.configure_allocator() == "keep" and calls == [1]  # mallopt once per process
    assert runtime.allocator_mode() == "keep"


@pytest.mark.parametrize("value", ["jemalloc", "KEEP", "1"])
def test_a_bad_allocator_mode_is_one_line_naming_it(monkeypatch, value):
    runtime, calls = _fresh_allocator(monkeypatch)
    monkeypatch.setenv(MALLOC_ENV, value)
    with pytest.raises(UserError, match=f"{MALLOC_ENV}='{value}' is not an allocator mode"):
        runtime.configure_allocator()
    assert calls == []


def test_the_allocator_mode_falls_back_where_mallopt_is_missing(monkeypatch):
    runtime, _ = _fresh_allocator(monkeypatch)
    monkeypatch.setattr(runtime, "_keep_freed_memory", lambda: False)
    monkeypatch.delenv(MALLOC_ENV, raising=False)
    assert runtime.configure_allocator() == "system"


def test_kept_memory_serves_a_large_tensor_without_new_page_faults():
    """The real mallopt, in a child process (it cannot be undone): after a warm-up, allocating
    and freeing a 32 MB tensor (above glibc's largest mmap threshold) again costs fresh page
    faults under glibc's defaults, and almost none once freed memory is kept."""
    import os
    import platform
    import sys

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    code = (
        "import resource, torch\n"
        "from engine.ml.runtime import configure_allocator\n"
        "print(configure_allocator())\n"
        "def faults():\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(10):\n"  # the heap grows to its working size
        "    torch.ones(8 * 2**20)\n"
        "before = faults()\n"
        "for _ in range(5):\n"
        "    torch.ones(8 * 2**20)\n"
        "print(faults() - before)\n"
    )
    counts = {}
    for mode in ("system", "keep"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, MALLOC_ENV: mode},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert out[0] == mode
        counts[mode] = int(out[1])
    # 5 x 32 MB is 40,960 pages of 4 KiB when each tensor arrives fresh.
    assert counts["system"] > 30_000 and counts["keep"] < 1_000, counts


def test_allocator_benchmark_compares_both_modes_in_child_processes():
    import json
    import sys
    from pathlib import Path

    pytest.importorskip("torch")
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "allocator.py"
    command = [sys.executable, str(script), "--batch", "8", "--sizes", "16", "--steps", "2"]
    command += ["--warmup", "1", "--rounds", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    out = json.loads(done.stdout)
    row = out["16x16"]
    assert row["system"]["step_ms"] > 0 and row["keep"]["images_per_s"] > 0
    assert row["speedup_step"] > 0 and row["speedup_eval"] > 0
    bad = subprocess.run(
        [sys.executable, str(script), "--sizes", "big"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--sizes 'big'" in bad.stderr
