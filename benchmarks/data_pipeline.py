"""Data pipeline throughput: our on-device tensor batches against the usual torchvision pipeline.

Both produce batches of 128 CIFAR-10 training images with random crop (padding 4), horizontal
flip, trigger stamping (10 % of images) and normalisation. The reference is what most backdoor
code does: a Dataset over the decoded uint8 arrays in memory (as torchvision's CIFAR10 keeps
them), per-item PIL transforms, a per-item stamping step, and a DataLoader with 2 workers.

Prints one JSON object. Usage: python benchmarks/data_pipeline.py [--batches N] [--rounds N] [--dataset NAME]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _script import run_main  # noqa: E402

from engine.ml.data import Normalizer, augment, batch_indices, load_dataset, to_float  # noqa: E402
from engine.ml.runtime import configure_cpu  # noqa: E402
from engine.ml.triggers import PatchTrigger, Placement, parse_trigger  # noqa: E402
from engine.tasks.train import poison_batch  # noqa: E402


def ours(data, batches: int, batch_size: int) -> float:
    g = torch.Generator().manual_seed(0)
    trigger = PatchTrigger(parse_trigger("bw:170"), Placement("per-image"))
    norm = Normalizer(data.mean, data.std)
    x_all, y_all = data.train_x, data.train_y
    done = 0
    start = time.perf_counter()
    while done < batches:
        for idx in batch_indices(x_all.shape[0], batch_size, g, True, True):
            x = to_float(augment(x_all[idx], g))  # crop and flip on uint8, as training does
            x, y, _ = poison_batch(x, y_all[idx], trigger, 0, 0.1, g)
            x = norm.inplace(x)
            done += 1
            if done >= batches:
                break
    return done * batch_size / (time.perf_counter() - start)


class ReferenceDataset(torch.utils.data.Dataset):
    """torchvision-style: HWC uint8 arrays in memory, PIL transforms per item, stamping per item."""

    def __init__(self, data):
        import torchvision.transforms as T

        self.images = data.train_x.permute(0, 2, 3, 1).numpy()
        self.labels = data.train_y.numpy()
        self.pattern = parse_trigger("bw:170")
        self.pre = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()])
        self.to_tensor = T.ToTensor()
        self.normalize = T.Normalize(data.mean, data.std)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        img = self.pre(Image.fromarray(self.images[i]))
        x = self.to_tensor(img)
        y = int(self.labels[i])
        if np.random.rand() < 0.1:
            r, c = np.random.randint(0, 30, size=2)
            x[:, r : r + 3, c : c + 3] = self.pattern
            y = 0
        return self.normalize(x), y


def reference(data, batches: int, batch_size: int, workers: int) -> float:
    loader = torch.utils.data.DataLoader(
        ReferenceDataset(data),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=False,
    )
    it = iter(loader)
    next(it)  # worker start-up is not counted
    start = time.perf_counter()
    done = 0
    for _ in range(batches):
        next(it)
        done += 1
    return done * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--batches", type=int, default=300, help="at most one epoch (390 at 128)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds of both; medians are reported"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    configure_cpu()
    t0 = time.perf_counter()
    data = load_dataset(args.dataset)
    load_s = time.perf_counter() - t0
    ours(data, 5, args.batch_size)  # warm-up
    ours_rounds, ref_rounds = [], []
    for _ in range(args.rounds):  # alternated, so a burst of other load hits both sides
        ours_rounds.append(ours(data, args.batches, args.batch_size))
        ref_rounds.append(reference(data, args.batches, args.batch_size, args.workers))
    ours_ips = statistics.median(ours_rounds)
    ref_ips = statistics.median(ref_rounds)
    print(
        json.dumps(
            {
                "benchmark": "data_pipeline",
                "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
                "dataset": args.dataset,
                "dataset_load_s": round(load_s, 3),
                "batch_size": args.batch_size,
                "batches": args.batches,
                "rounds": args.rounds,
                "ours_rounds": [round(v) for v in ours_rounds],
                "reference_rounds": [round(v) for v in ref_rounds],
                "ours_images_per_s": round(ours_ips),
                "reference_images_per_s": round(ref_ips),
                "reference": f"torchvision PIL transforms + per-item stamping + DataLoader({args.workers} workers)",
                "speedup": round(ours_ips / ref_ips, 1),
                "target_speedup": 10,
            }
        )
    )


if __name__ == "__main__":
    run_main(main)
