"""MESA search throughput: generator steps per second, summed over the betas.

Two loops on the same model, batch and betas, in the same run:

- ours: engine.ml.mesa.MesaTrainer; frozen weights (no weight gradients), all betas' stamped
  batches in one forward/backward pass, uint8 images on the device, channels_last and bf16
  autocast where the precision resolves to bf16 (then also timed in fp32, ``ours_fp32``);
- reference: a faithful one-beta-at-a-time loop like the authors' script: a DataLoader over a
  TensorDataset of normalised float images, the model's weights requiring gradients (backprop
  into them), fp32, no channels_last, one location per batch, one beta after the other.

Random weights and random images (throughput does not depend on them). Prints one JSON object
on stdout (progress on stderr). ``--quick`` runs tiny sizes (used by the CPU test).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _script import run_main  # noqa: E402

from engine.ml.data import Normalizer  # noqa: E402
from engine.ml.mesa import (  # noqa: E402
    MesaConfig,
    MesaTrainer,
    StatisticsNetwork,
    TriggerGenerator,
    mine_estimate,
)
from engine.ml.models import build_model  # noqa: E402
from engine.ml.runtime import (  # noqa: E402
    configure_cpu,
    configure_device,
    environment,
    pick_device,
    resolve_precision,
)

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ours(model, images_u8, betas, args, device, precision) -> list[float]:
    """Seconds per step (all betas together) after warm-up."""
    cfg = MesaConfig(
        betas=tuple(betas),
        steps=args.steps,
        batch_size=args.batch,
        hidden=args.hidden,
        channels_last=not args.no_channels_last,
    )
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    normalizer = Normalizer(CIFAR_MEAN, CIFAR_STD, device)
    trainer = MesaTrainer(
        model,
        normalizer,
        images_u8,
        [(b, 0, f"b{b}") for b in betas],
        cfg,
        device=device,
        precision=precision,
    )
    times = []
    for i in range(args.warmup + args.steps):
        _sync(device)
        t0 = time.perf_counter()
        trainer.step()
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    trainer.take_window()
    return times


def time_reference(model, images_u8, betas, args, device) -> list[float]:
    """Seconds per generator-plus-statistics step of one beta, one beta after the other."""
    from torch.utils.data import DataLoader, TensorDataset

    model = model.to(memory_format=torch.contiguous_format).eval()
    for p in model.parameters():
        p.requires_grad_(True)  # the script back-propagates into the frozen model's weights
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    pixels = images_u8.cpu().float() / 255.0
    loader = DataLoader(TensorDataset(pixels), batch_size=args.batch, shuffle=True, drop_last=True)
    size = pixels.shape[-1]
    times = []
    for beta in betas:
        G = TriggerGenerator(args.hidden).to(device)
        T = StatisticsNetwork(64, 27, args.hidden).to(device)
        opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
        opt_t = torch.optim.Adam(T.parameters(), lr=2e-4, betas=(0.5, 0.999))
        moving_average = None
        batches = iter(loader)
        for i in range(args.warmup + args.steps):
            try:
                (x,) = next(batches)
            except StopIteration:
                batches = iter(loader)
                (x,) = next(batches)
            _sync(device)
            t0 = time.perf_counter()
            x = x.to(device)
            b = x.shape[0]
            z, zm = torch.rand(b, 64, device=device), torch.rand(b, 64, device=device)
            t = G(z)
            stamped = (t + 0.1 * torch.randn_like(t)).view(b, 3, 3, 3)
            r, c = torch.randint(0, size - 3, (2,)).tolist()  # one place per batch, as the script
            x = x.clone()
            x[:, :, r : r + 3, c : c + 3] = stamped
            x = (x - mean.to(device)) / std.to(device)
            p = F.softmax(model(x), dim=1)[:, 0]
            hinge = torch.clamp(p, max=beta).mean()
            mine = mine_estimate(T, z, zm, t)
            opt_g.zero_grad()
            (-hinge - 0.1 * mine).backward()
            opt_g.step()
            z2, zm2 = torch.rand(b, 64, device=device), torch.rand(b, 64, device=device)
            t2 = G(z2)
            joint = T(z2, t2).mean()
            e = torch.exp(T(zm2, t2)).mean()
            moving_average = (
                e.detach()
                if moving_average is None
                else (0.999 * moving_average + 0.001 * e.detach())
            )
            opt_t.zero_grad()
            (-(joint - torch.log(e) * e.detach() / moving_average)).backward()
            opt_t.step()
            _sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    return times


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--betas", default="0.9,0.8,0.5")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--images", type=int, default=2048, help="random images in the pool")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument(
        "--skip-fp32", action="store_true", help="do not also time ours in fp32 when bf16 is used"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a CPU check")
    args = parser.parse_args(argv)
    if args.quick:
        args.arch, args.batch, args.hidden, args.steps, args.images = "small", 8, 32, 2, 64
    return args


def measure(args: argparse.Namespace) -> dict:
    """The figures as one JSON-ready dict (benchmarks/gpu_bench.py calls this as its last stage)."""
    configure_cpu()
    device = pick_device(args.device)
    configure_device(device)
    precision = resolve_precision(args.precision, device)
    betas = [float(b) for b in args.betas.split(",")]
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, device=device)
    model = build_model(args.arch, 10, 3).to(device).eval()

    print(f"ours: {args.arch} batch {args.batch} x {len(betas)} betas on {device}", file=sys.stderr)
    ours = time_ours(model, images, betas, args, device, precision)
    ours_rate = len(betas) / statistics.median(ours)
    out = {
        "benchmark": "mesa_speed",
        "arch": args.arch,
        "batch": args.batch,
        "betas": betas,
        "hidden": args.hidden,
        "timed_steps": args.steps,
        "environment": environment(device),
        "ours": {
            "generator_steps_per_s": round(ours_rate, 4),
            "median_s_per_step_all_betas": round(statistics.median(ours), 4),
            "precision": precision,
            "channels_last": not args.no_channels_last,
        },
    }
    if precision == "bf16" and not args.skip_fp32:
        print("ours in fp32 (the same loop without autocast)", file=sys.stderr)
        ours_fp32 = time_ours(model, images, betas, args, device, "fp32")
        out["ours_fp32"] = {
            "generator_steps_per_s": round(len(betas) / statistics.median(ours_fp32), 4),
            "median_s_per_step_all_betas": round(statistics.median(ours_fp32), 4),
            "precision": "fp32",
            "channels_last": not args.no_channels_last,
        }
    if not args.skip_reference:
        print("reference: one beta at a time, weights with gradients, fp32", file=sys.stderr)
        ref = time_reference(model, images, betas, args, device)
        ref_rate = 1.0 / statistics.median(ref)
        out["reference"] = {
            "generator_steps_per_s": round(ref_rate, 4),
            "median_s_per_step_one_beta": round(statistics.median(ref), 4),
            "precision": "fp32",
            "channels_last": False,
        }
        out["speedup"] = round(ours_rate / ref_rate, 3) if math.isfinite(ref_rate) else None
    return out


def main() -> None:
    print(json.dumps(measure(parse_args())))


if __name__ == "__main__":
    run_main(main)
