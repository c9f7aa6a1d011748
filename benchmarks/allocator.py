"""Training-step speed with freed memory kept in the process, against glibc's defaults.

``configure_allocator`` (engine/ml/runtime.py) stops glibc from handing large allocations out as
fresh mmap pages and from returning freed memory to the system. A process cannot undo that, so
each mode runs in its own child process (``MESA_TUI_MALLOC=keep`` and ``system``), alternating,
``--rounds`` times each. A child times ``--steps`` training steps of the ``small`` network (the
cpu-quick one) on random batches: forward, loss, backward and the SGD step, at the precision
``auto`` picks, channels_last, after ``--warmup`` untimed steps; then the evaluation forward pass
of a batch. It reports the median step time and the minor page faults per step.

Prints one JSON object. Usage: python benchmarks/allocator.py [--batch 512] [--sizes 32,24]
       [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = ("system", "keep")


def child(batch: int, sizes: list[int], steps: int, warmup: int) -> dict:
    import torch
    import torch.nn.functional as F

    from engine.ml.models import build_model
    from engine.ml.runtime import autocast, configure_cpu, pick_device, resolve_precision

    configure_cpu()
    device = pick_device("cpu")
    precision = resolve_precision("auto", device)
    torch.manual_seed(0)
    model = build_model("small", 10, 3).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    out: dict = {"precision": precision, "threads": torch.get_num_threads()}
    for size in sizes:
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,))
        times, faults = [], []
        model.train()
        for i in range(warmup + steps):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            with autocast(device, precision):
                loss = F.cross_entropy(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if i >= warmup:
                times.append(time.perf_counter() - start)
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        model.eval()
        with torch.no_grad(), autocast(device, precision):
            model(x)  # warm
            start = time.perf_counter()
            for _ in range(3):
                model(x)
            eval_s = (time.perf_counter() - start) / 3
        out[str(size)] = {
            "step_ms": round(1000 * statistics.median(times), 2),
            "faults_per_step": round(statistics.median(faults)),
            "images_per_s": round(batch / statistics.median(times)),
            "eval_forward_ms": round(1000 * eval_s, 2),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--sizes", default="32,24", help="image sides, comma-separated")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes {args.sizes!r}: write image sides such as 32,24")
    if not sizes or min(sizes) < 8 or args.batch < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--sizes (8 or more), --batch, --steps and --rounds must be positive")
    if args.child:
        print(json.dumps(child(args.batch, sizes, args.steps, args.warmup)))
        return 0
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:  # alternating, so a drift of the machine's speed hits both alike
            command = [sys.executable, __file__, "--child", mode, "--batch", str(args.batch)]
            command += ["--sizes", args.sizes, "--steps", str(args.steps)]
            command += ["--warmup", str(args.warmup)]
            env = {**os.environ, "MESA_TUI_MALLOC": mode}
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(done.stdout))
    result: dict = {
        "benchmark": "allocator",
        "batch": args.batch,
        "steps": args.steps,
        "rounds": args.rounds,
        "precision": runs["keep"][0]["precision"],
        "threads": runs["keep"][0]["threads"],
    }
    for size in sizes:
        row = {}
        for mode in MODES:
            cells = [r[str(size)] for r in runs[mode]]
            row[mode] = {
                key: statistics.median(c[key] for c in cells)
                for key in ("step_ms", "faults_per_step", "images_per_s", "eval_forward_ms")
            }
        row["speedup_step"] = round(row["system"]["step_ms"] / row["keep"]["step_ms"], 3)
        row["speedup_eval"] = round(
            row["system"]["eval_forward_ms"] / row["keep"]["eval_forward_ms"], 3
        )
        result[f"{size}x{size}"] = row
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
