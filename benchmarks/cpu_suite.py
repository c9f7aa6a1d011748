"""Run the CPU benchmarks one after the other and keep their JSON with the machine that produced it.

Each benchmark is a separate script printing one JSON object (with its own reference measured in
the same run); this runs them in sequence on a quiet machine and writes
``OUT/<name>.json`` plus ``OUT/machine.json`` (CPU model, cores, bf16 support, load average
before and after, torch version, date). The README's "Measured" table is read from these files.

Usage: python benchmarks/cpu_suite.py --out benchmarks/results/cpu-<machine> [--only a,b]
       [--home DIR] (the data home holding an imported cifar10, for the data benchmark)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name -> extra arguments (the defaults are the issues' sizes)
BENCHMARKS: dict[str, list[str]] = {
    "ingest": [],
    "queue_latency": [],
    "poll": [],
    "tui_responsiveness": [],
    "data_pipeline": [],
    "mesa_speed": [],
    "cpu_quick": [],  # the whole cpu-quick attack (about 5 minutes)
}


def machine() -> dict:
    from engine.ml.runtime import cpu_has_native_bf16, cpu_name

    return {
        "cpu": cpu_name(),
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "native_bf16": cpu_has_native_bf16(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default="", help="comma-separated names; default: all")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per benchmark")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(
            f"error: unknown benchmark {unknown[0]!r}; use {', '.join(BENCHMARKS)}", file=sys.stderr
        )
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    info["load_before"] = os.getloadavg()[0]
    results: dict[str, dict] = {}
    for name in names:
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *BENCHMARKS[name]],
            capture_output=True,
            text=True,
            timeout=args.timeout,
            cwd=ROOT,
        )
        took = time.monotonic() - started
        try:
            result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
        except json.JSONDecodeError:
            result = {}
        if proc.returncode != 0 or not result:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            result = {"error": f"exit {proc.returncode}: {tail[0]}"}
        result["suite_wall_s"] = round(took, 1)
        result["load_after"] = os.getloadavg()[0]
        (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        results[name] = result
        print(f"{name}: {took:.0f} s{' ERROR ' + result['error'] if 'error' in result else ''}")
    try:
        import torch

        info["torch"] = torch.__version__
        info["threads"] = torch.get_num_threads()
    except ImportError:
        pass
    info["load_after"] = os.getloadavg()[0]
    (out / "machine.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps({"machine": info, "benchmarks": sorted(results)}))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
