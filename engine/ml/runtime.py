"""Device, precision and seeding, in one place; nothing assumes CUDA."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform
import random
import sys

import numpy as np
import torch

from engine.errors import UserError
from engine.run_environment import cudnn_benchmark_setting, malloc_setting, thread_budget


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"device '{name}' was asked for but no CUDA GPU is visible; use --device cpu or auto"
        )
    return torch.device(name)


@functools.cache
def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() is empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True on CPUs with AMX or AVX-512 BF16 (bf16 matmuls run natively there)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def configure_device(device: torch.device) -> None:
    """Set the process up for a job on ``device``: on CUDA, cuDNN's autotuner for the run's fixed
    shapes (``MESA_TUI_CUDNN_BENCHMARK``, on by default). Nothing on other devices."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark_setting()


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked for (resolve 'auto' first), else a no-op."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator for the run's own random streams."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def configure_cpu() -> None:
    """Set the process up for a CPU job: the thread budget, then the allocator (below)."""
    configure_threads()
    configure_allocator()


def configure_threads() -> None:
    """Use the thread budget: two jobs that each take every core on the same CPU run several
    times slower than their share (OpenMP threads spin while they wait for each other)."""
    n = thread_budget()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_allocator_mode = "system"


def configure_allocator() -> str:
    """Keep freed memory in the process (glibc); returns the mode in force: keep or system.

    glibc serves every allocation above 32 MB (and, after it frees one, anything above its
    dynamic threshold) with a fresh ``mmap`` and gives freed memory back to the system, so a
    training step's large activations arrive as new pages that the kernel must fault in and zero,
    step after step: 12,785 page faults per 512-image 32x32 step of the ``small`` network on the
    2-core EPYC VM, none once kept, and 276 instead of 310 ms per step (benchmarks/allocator.py).
    Mode ``keep`` (the default) serves everything from the heap and never trims it, so the
    process holds on to its peak; ``MESA_TUI_MALLOC=system`` leaves glibc as it is. Once kept, a
    process stays so. A no-op on other C libraries."""
    global _allocator_mode
    mode = malloc_setting()
    if mode == "keep" and _allocator_mode != "keep" and _keep_freed_memory():
        _allocator_mode = "keep"
    return _allocator_mode


def allocator_mode() -> str:
    """keep once configure_allocator has kept freed memory in this process, else system."""
    return _allocator_mode


def _keep_freed_memory() -> bool:
    """No mmap for allocations, no trimming of the heap; False where the C library is not glibc."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)  # the process's own C library
        return bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**30) and libc.mallopt(_M_MMAP_MAX, 0))
    except (OSError, AttributeError):
        return False


def peak_memory_mb(device: torch.device) -> float:
    """Peak resident memory of this process (CPU) or peak allocated memory (CUDA), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def environment(device: torch.device) -> dict[str, str]:
    """What a run records about where it ran."""
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": str(torch.get_num_threads()),
        "malloc": allocator_mode(),
    }
    return env
