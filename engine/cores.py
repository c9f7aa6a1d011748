"""How many CPU threads a run may use (torch-free: the engine imports it, and so does engine.ml).

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
    n = int(value) if value.isdigit() else 0
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


def check_run_environment() -> None:
    """Refuse a bad ``MESA_TUI_THREADS`` or ``MESA_TUI_MALLOC`` before anything is written
    (the run command and the engine call it; each task reads them again when it starts)."""
    thread_budget()
    malloc_setting()
