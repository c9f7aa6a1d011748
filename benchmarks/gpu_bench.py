"""GPU figures in one run (see benchmarks/gpu.sh for how it is launched on a lent machine).

1. seconds per epoch of ResNet-18 on the full CIFAR-10 training set at batch 128 and 512;
2. the clean-cifar10 preset: wall time and clean accuracy;
3. the paper's attack recipe on that clean model (paper-cifar10 preset, bw:170 -> 0): ASR.
Every figure names the device. ``--tiny`` runs the same code paths, ResNet-18 included, on a few
hundred images and one epoch each (tests/tasks/test_benchmarks.py runs it on the CPU).

Prints one JSON object and writes it to --out when given.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from _script import run_main  # noqa: E402

from engine.ml.data import import_dataset, load_dataset  # noqa: E402
from engine.ml.runtime import environment, pick_device  # noqa: E402
from engine.reporter import MemoryReporter  # noqa: E402
from engine.specs import build_spec  # noqa: E402
from engine.tasks.train import run as train  # noqa: E402


def timed_train(spec, workdir: Path) -> tuple[dict, float]:
    reporter = MemoryReporter(workdir)
    start = time.perf_counter()
    result = train(spec, reporter)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result.metrics | {"artifact": result.artifact}, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--archive", default=None, help="CIFAR-10 image-folder archive to import first"
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("--tiny", action="store_true", help="a few hundred images, for a CPU check")
    parser.add_argument(
        "--clean-epochs", type=int, default=None, help="override the clean-cifar10 epochs"
    )
    parser.add_argument("--skip-clean", action="store_true")
    args = parser.parse_args()
    if args.archive:
        import_dataset(args.archive, "cifar10")
    load_dataset("cifar10")
    device = pick_device("auto")
    limits = {"max_train_images": 160, "max_test_images": 64} if args.tiny else {}
    out: dict = {"benchmark": "gpu", "environment": environment(device), "tiny": args.tiny}
    with tempfile.TemporaryDirectory() as tmp:
        for bs in (128, 512):
            spec = build_spec(
                "train",
                overrides={
                    "arch": "resnet18",
                    "epochs": 1,
                    "batch_size": bs,
                    "trigger": "none",
                    "poison_rate": 0.0,
                    "schedule": "constant",
                    "lr": 0.05,
                    **limits,
                },
            )
            metrics, _ = timed_train(spec, Path(tmp) / f"epoch-{bs}")
            out[f"resnet18_epoch_s_bs{bs}"] = round(metrics["time/train_s"], 2)
            out[f"resnet18_images_per_s_bs{bs}"] = round(metrics["perf/images_per_s"])
        if not args.skip_clean:
            over = {"epochs": args.clean_epochs, **limits}
            if args.tiny:
                over.update(epochs=args.clean_epochs or 1)
            spec = build_spec("train", preset="clean-cifar10", overrides=over)
            metrics, wall = timed_train(spec, Path(tmp) / "clean")
            out["clean_cifar10"] = {
                "epochs": spec.epochs,
                "wall_s": round(wall, 1),
                "acc_clean": round(metrics["eval/acc_clean"], 4),
            }
            attack = build_spec(
                "train",
                preset="paper-cifar10",
                overrides={
                    "init_from": metrics["artifact"],
                    "trigger": "bw:170",
                    "target": 0,
                    "epochs": 1 if args.tiny else None,
                    **limits,
                },
            )
            metrics, wall = timed_train(attack, Path(tmp) / "attack")
            out["paper_attack_bw170"] = {
                "epochs": attack.epochs,
                "wall_s": round(wall, 1),
                "acc_clean": round(metrics["eval/acc_clean"], 4),
                "asr": round(metrics["eval/asr"], 4),
            }
    text = json.dumps(out)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    run_main(main)
