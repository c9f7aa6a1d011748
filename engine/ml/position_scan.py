"""Where a patch trigger works: a forward-only probe of every stamp position.

A backdoor implanted at one fixed place answers to its patch at that place only: on the CPU
network one pixel off leaves 1-6 % ASR instead of 97-100 %, so a search that stamps at random
places (the paper's) almost never sees the trigger work, and neither gradients of clean images
nor Neural Cleanse's mask find it (issue 31's first design, docs/results/fixed-position/).
What does respond is the target probability of *near* patterns at the exact place: a grey patch
there already flips some images, and random black-and-white patches nudge the target's
probability up measurably. So the scan stamps a small set of probe patterns (grey, white,
black and random black-and-white ones) at every valid offset on a few defender images and keeps,
per offset and class, the largest mean softmax probability over the probes. One forward pass
serves every class.

A class whose map has a sharp peak is a fixed-position suspect: its *lift* (the peak minus the
map's median) stands out from the other classes' lifts. A model attacked at random places gives
the target a high map everywhere (a high median, a small lift): the scan leaves it to the
MESA search's validity, which already detects it. The map also warm-starts the ``learned``
position distribution of a search (``engine.ml.mesa``): the probe probability at an offset
plays the role of the search's own score there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.ml.data import Normalizer, to_float
from engine.ml.runtime import autocast
from engine.ml.triggers import position_grid, stamp


@dataclass(frozen=True)
class ScanConfig:
    """How hard the scan looks. The cost is probes x offsets x images forward passes (on a
    32x32 image with a 3x3 patch: 900 offsets)."""

    probes: int = 16  # grey, white and black, then random black-and-white patterns
    images: int = 16  # defender images each probe is stamped on, at every offset
    seed: int = 0
    chunk: int = 4096  # images per forward pass


@dataclass
class PositionScan:
    """Per offset (rows, cols of the top-left pixel) and class: the largest mean target
    probability over the probes. ``probs`` is (Hp, Wp, classes), float32 on the CPU."""

    probs: torch.Tensor
    trigger_size: int

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.probs.shape[0]), int(self.probs.shape[1])

    def class_map(self, target: int) -> torch.Tensor:
        return self.probs[..., target]

    def lift(self, target: int) -> float:
        """The map's peak minus its median: large for a backdoor that lives at one place."""
        flat = self.class_map(target).flatten()
        return float(flat.max() - flat.median())

    def peak(self, target: int) -> tuple[int, int]:
        flat = self.class_map(target).flatten()
        best = int(flat.argmax())
        return best // self.grid[1], best % self.grid[1]

    def summary(self, target: int) -> dict[str, Any]:
        flat = self.class_map(target).flatten()
        row, col = self.peak(target)
        return {
            "lift": round(self.lift(target), 6),
            "peak": round(float(flat.max()), 6),
            "median": round(float(flat.median()), 6),
            "peak_row": row,
            "peak_col": col,
        }

    def to_json(self) -> str:
        return json.dumps(
            {
                "trigger_size": self.trigger_size,
                "grid": list(self.grid),
                "classes": int(self.probs.shape[2]),
                "probs": [
                    [[round(float(v), 5) for v in cell] for cell in row]
                    for row in self.probs.tolist()
                ],
            }
        )


def probe_patterns(channels: int, k: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """(count, C, k, k): grey, white, black, then random black-and-white patches (the same in
    every channel, like the paper's triggers)."""
    fixed = [torch.full((channels, k, k), v) for v in (0.5, 1.0, 0.0)][:count]
    random = [
        (torch.rand(k, k, generator=generator) > 0.5).float().expand(channels, k, k)
        for _ in range(max(0, count - len(fixed)))
    ]
    return torch.stack(fixed + random)


def scan_draws(
    config: ScanConfig, n_images: int, channels: int, trigger_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan's random draws, in its order, from ``config.seed`` alone: which of ``n_images``
    defender images it stamps, and its probes (``probe_patterns``). A MESA repair draws them
    again to find the probes that are valid triggers (``engine.ml.mesa.probe_validity``)."""
    generator = torch.Generator().manual_seed(config.seed)
    pick = torch.randperm(n_images, generator=generator)[: config.images]
    return pick, probe_patterns(channels, trigger_size, config.probes, generator)


@torch.no_grad()
def scan_positions(
    model: nn.Module,
    normalizer: Normalizer,
    images_u8: torch.Tensor,
    trigger_size: int,
    config: ScanConfig,
    *,
    precision: str = "fp32",
) -> PositionScan:
    """Stamp every probe at every offset on ``config.images`` of ``images_u8`` (drawn with
    ``config.seed``) and return the per-offset, per-class map. The model is used as it is
    (put it in eval mode first)."""
    device = images_u8.device
    pick, probes = scan_draws(config, images_u8.shape[0], images_u8.shape[1], trigger_size)
    x = to_float(images_u8[pick.to(device)])
    m = x.shape[0]
    rows, cols = position_grid((x.shape[2], x.shape[3]), trigger_size)
    offsets = torch.cartesian_prod(torch.arange(rows), torch.arange(cols)).to(device)
    probes = probes.to(device)
    per_pass = max(1, config.chunk // m)  # offsets whose stamped images share one pass
    best: torch.Tensor | None = None
    for probe in probes:
        means = []
        for start in range(0, offsets.shape[0], per_pass):
            where = offsets[start : start + per_pass]
            stamped = stamp(x.repeat(where.shape[0], 1, 1, 1), probe, where.repeat_interleave(m, 0))
            with autocast(device, precision):
                logits = model(normalizer(stamped))
            probs = torch.softmax(logits.float(), 1).view(where.shape[0], m, -1).mean(1)
            means.append(probs.cpu())
        per_probe = torch.cat(means)
        best = per_probe if best is None else torch.maximum(best, per_probe)
    assert best is not None
    return PositionScan(best.view(rows, cols, -1), trigger_size)


def position_prior(scan: PositionScan, target: int, beta: float) -> torch.Tensor:
    """Rewards (flat, float64) for a search's ``learned`` position distribution: the capped log
    score min(log p, log beta) of the target's probe probability at each offset, the same
    quantity the search averages over its own stamps there."""
    p = scan.class_map(target).flatten().double().clamp_min(1e-12)
    return torch.minimum(p.log(), torch.tensor(beta, dtype=torch.float64).log())


def position_support(scan: PositionScan, target: int, min_lift: float) -> torch.Tensor | None:
    """The offsets (flat bool mask) a search of ``target`` stamps at: where the target's map
    rises at least halfway from its median to its peak, when the peak lifts at least
    ``min_lift`` above the median (a trigger that lives at few places); None otherwise (no
    peak: every offset, the paper's random placement)."""
    lift = scan.lift(target)
    if lift < min_lift:
        return None
    flat = scan.class_map(target).flatten()
    return flat >= flat.median() + lift / 2
