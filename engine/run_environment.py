"""A run's switches from the environment: its CPU threads, allocator, torch.compile and cuDNN
autotuning (``MESA_TUI_*``). Torch-free: the engine imports it, and so does engine.ml.

Two runs that each take every core of the same CPU run several times slower than their share:
OpenMP threads spin while they wait for each other. So the engine shares the cores out among
its CPU slots and tells each child its share through ``MESA_TUI_THREADS``; a person may set the
variable too (for the engine, a benchmark, or one foreground run), and their value wins.
"""

from __future__ import annotations

import os

from engine.errors import UserError

THREADS_ENV = "MESA_TUI_THREADS"
MALLOC_ENV = "MESA_TUI_MALLOC"
COMPILE_ENV = "MESA_TUI_COMPILE"
CUDNN_BENCHMARK_ENV = "MESA_TUI_CUDNN_BENCHMARK"


def usable_cores() -> int:
    """Cores this process may run on (containers often report fewer than the host)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def thread_budget() -> int:
    """``MESA_TUI_THREADS`` when set, else every usable core."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return usable_cores()
    n = int(value) if value.isascii() and value.isdigit() else 0
    if n < 1:
        raise UserError(
            f"{THREADS_ENV}={value!r} is not a thread count; set it to 1 or more, or unset it"
        )
    return n


def malloc_setting() -> str:
    """``MESA_TUI_MALLOC``: keep (the default: a run keeps the memory it frees, see
    ``engine.ml.runtime.configure_allocator``) or system (the C library's own behaviour)."""
    value = os.environ.get(MALLOC_ENV, "").strip()
    if not value:
        return "keep"
    if value not in ("keep", "system"):
        raise UserError(
            f"{MALLOC_ENV}={value!r} is not an allocator mode; set it to keep or system, or unset it"
        )
    return value


def _switch(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if value not in ("0", "1"):
        raise UserError(f"{name}={value!r} is not a switch; set it to 1 or 0, or unset it")
    return value == "1"


def compile_setting() -> bool:
    """``MESA_TUI_COMPILE=1``: training compiles its step's model with ``torch.compile`` (off by
    default: compiling costs tens of seconds, which only a long run on a GPU earns back;
    ``benchmarks/gpu_bench.py`` measures both and decides)."""
    return _switch(COMPILE_ENV, False)


def cudnn_benchmark_setting() -> bool:
    """``MESA_TUI_CUDNN_BENCHMARK``: on CUDA, cuDNN times its algorithms for the run's fixed
    shapes and keeps the fastest (on by default; 0 leaves cuDNN's heuristics)."""
    return _switch(CUDNN_BENCHMARK_ENV, True)


def check_run_environment() -> None:
    """Refuse a bad ``MESA_TUI_THREADS``, ``MESA_TUI_MALLOC``, ``MESA_TUI_COMPILE`` or
    ``MESA_TUI_CUDNN_BENCHMARK`` before anything is written (the run command and the engine call
    it; each task reads them again when it starts)."""
    thread_budget()
    malloc_setting()
    compile_setting()
    cudnn_benchmark_setting()
