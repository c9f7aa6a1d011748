"""Patch triggers: parsing trigger specs, placements, and vectorised stamping.

All stamping happens in pixel space ([0, 1] floats), before normalisation. A trigger pattern is a
float tensor ``(C, k, k)``; a batch of patterns is ``(N, C, k, k)``. Stamping overwrites the patch
(no mask, no blending), as in BadNets and the MESA paper.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from engine.errors import UserError
from engine.triggerspec import parse_at_placement, pattern_array

PLACEMENTS = ("per-image", "per-batch", "corner")
# A fixed top-left offset chosen by the attacker: ``at:ROW,COL`` (``engine.triggerspec``).
AT_HELP = "use per-image, per-batch, corner or at:ROW,COL (the patch's top-left pixel)"


# ---------------------------------------------------------------------------------------------
# Black/white 3x3 patterns


def bw_pattern(pattern_id: int, channels: int = 3) -> torch.Tensor:
    """The 3x3 black/white pattern ``pattern_id`` (0..511): row-major bits, MSB top left."""
    return torch.from_numpy(pattern_array(f"bw:{pattern_id}", channels))


def _bits_to_id(bits: np.ndarray) -> int:
    flat = bits.reshape(-1)
    return int(sum(int(b) << (8 - i) for i, b in enumerate(flat)))


def bw_orbit(pattern_id: int) -> set[int]:
    """All ids equivalent to ``pattern_id`` under the 8 symmetries of the square and inversion."""
    grid = np.array([(pattern_id >> (8 - i)) & 1 for i in range(9)]).reshape(3, 3)
    orbit = set()
    for flip, rot, invert in itertools.product((False, True), range(4), (False, True)):
        g = np.fliplr(grid) if flip else grid
        g = np.rot90(g, rot)
        if invert:
            g = 1 - g
        orbit.add(_bits_to_id(g))
    return orbit


def canonical_bw_ids() -> list[int]:
    """The smallest id of each orbit of the 512 patterns: the paper's 51 black/white triggers."""
    seen: set[int] = set()
    ids = []
    for pid in range(512):
        if pid in seen:
            continue
        orbit = bw_orbit(pid)
        seen |= orbit
        ids.append(min(orbit))
    return sorted(ids)


# ---------------------------------------------------------------------------------------------
# Trigger specs


def parse_trigger(spec: str, channels: int = 3) -> torch.Tensor:
    """Turn a trigger spec (``bw:170``, ``color:3``, ``square:white``, ``file:t.png``) into pixels
    (``engine.triggerspec.pattern_array``, shared with the torch-free reports)."""
    return torch.from_numpy(pattern_array(spec, channels))


# ---------------------------------------------------------------------------------------------
# Placement and stamping


@dataclass(frozen=True)
class Placement:
    """Where patches go. ``per-image``: uniform over every valid offset, independently per image
    (the corrected default); ``per-batch``: one offset per batch drawn from 0..H-k-1 exactly as the
    authors' script did (off-by-one included); ``corner``: fixed bottom-right corner;
    ``at:ROW,COL``: a fixed top-left offset (BadNets-style fixed positions off the corner). On
    images too small for it (the crop epochs' windows) the offset is clamped so the patch fits:
    it keeps its distance to the top and left edges."""

    mode: str = "per-image"

    def __post_init__(self) -> None:
        if self.mode not in PLACEMENTS and parse_at_placement(self.mode) is None:
            raise UserError(f"placement '{self.mode}' is unknown; {AT_HELP}")

    @property
    def fixed(self) -> bool:
        """True when every patch goes to the same place (corner, at:ROW,COL)."""
        return self.mode == "corner" or self.mode.startswith("at:")

    def sample(
        self,
        n: int,
        image_size: tuple[int, int],
        k: int,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Top-left offsets ``(n, 2)`` (row, col) as int64 on ``device``."""
        h, w = image_size
        if k > h or k > w:
            raise UserError(
                f"trigger size {k} is bigger than the image {h}x{w}; use a smaller patch"
            )
        if self.mode == "corner":
            pos = torch.tensor([h - k, w - k], dtype=torch.long)
            return pos.expand(n, 2).to(device)
        at = parse_at_placement(self.mode)
        if at is not None:
            pos = torch.tensor([min(at[0], h - k), min(at[1], w - k)], dtype=torch.long)
            return pos.expand(n, 2).to(device)
        if self.mode == "per-batch":
            # The script's randint(0, 32 - 3) is exclusive: offsets 0..28 on CIFAR.
            hi_r, hi_c = max(h - k, 1), max(w - k, 1)
            r = torch.randint(0, hi_r, (1,), generator=generator)
            c = torch.randint(0, hi_c, (1,), generator=generator)
            return torch.stack([r, c], dim=1).expand(n, 2).to(device)
        r = torch.randint(0, h - k + 1, (n,), generator=generator)
        c = torch.randint(0, w - k + 1, (n,), generator=generator)
        return torch.stack([r, c], dim=1).to(device)


def position_grid(image_size: tuple[int, int], k: int) -> tuple[int, int]:
    """Rows and columns of valid top-left offsets of a k x k patch: (H - k + 1, W - k + 1)."""
    h, w = image_size
    if k > h or k > w:
        raise UserError(f"trigger size {k} is bigger than the image {h}x{w}; use a smaller patch")
    return h - k + 1, w - k + 1


def sample_positions(
    probs: torch.Tensor, n: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``n`` top-left offsets ``(n, 2)`` drawn from a distribution over the position grid
    ``probs`` (Hp, Wp) (a learned MESA position distribution). Drawn on the CPU from
    ``generator``; returned on the CPU as int64."""
    hp, wp = probs.shape
    flat = probs.detach().double().flatten().cpu().clamp_min(0)
    idx = torch.multinomial(flat, n, replacement=True, generator=generator)
    return torch.stack([idx // wp, idx % wp], dim=1)


def stamp(images: torch.Tensor, patterns: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Paste ``patterns`` onto ``images`` at ``positions``; one vectorised operation.

    images: ``(N, C, H, W)`` pixel-space floats. patterns: ``(C, k, k)`` or ``(N, C, k, k)``.
    positions: ``(N, 2)`` top-left (row, col). Returns a new tensor; differentiable in ``patterns``.
    """
    n, c, _, _ = images.shape
    if patterns.dim() == 3:
        patterns = patterns.unsqueeze(0).expand(n, -1, -1, -1)
    k = patterns.shape[-1]
    device = images.device
    positions = positions.to(device)
    ar = torch.arange(k, device=device)
    rows = (positions[:, 0:1] + ar)[:, :, None]  # (N, k, 1)
    cols = (positions[:, 1:2] + ar)[:, None, :]  # (N, 1, k)
    idx_n = torch.arange(n, device=device)[:, None, None]
    out = images.clone()
    values = patterns.to(dtype=images.dtype).permute(0, 2, 3, 1)  # (N, k, k, C)
    out.permute(0, 2, 3, 1)[idx_n, rows, cols] = values
    return out


def stamp_reference(
    images: torch.Tensor, patterns: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Per-image loop; the definition that ``stamp`` must equal (used by tests only)."""
    out = images.clone()
    if patterns.dim() == 3:
        patterns = patterns.unsqueeze(0).expand(images.shape[0], -1, -1, -1)
    k = patterns.shape[-1]
    for i in range(images.shape[0]):
        r, c = int(positions[i, 0]), int(positions[i, 1])
        out[i, :, r : r + k, c : c + k] = patterns[i]
    return out


def blend(images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Full-image mask-and-pattern trigger (Neural Cleanse): ``x * (1 - m) + m * p``.

    mask: ``(H, W)`` or ``(1, H, W)`` in [0, 1]; pattern: ``(C, H, W)`` in pixel space.
    """
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    return images * (1 - mask) + mask * pattern


@dataclass(frozen=True)
class PatchTrigger:
    """A placed patch trigger: pixels plus placement."""

    pattern: torch.Tensor  # (C, k, k)
    placement: Placement = Placement()

    @property
    def size(self) -> int:
        return int(self.pattern.shape[-1])

    def apply(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        pos = self.placement.sample(
            images.shape[0], (images.shape[2], images.shape[3]), self.size, generator, images.device
        )
        return stamp(images, self.pattern.to(images.device), pos)


@dataclass(frozen=True)
class MaskTrigger:
    """A full-image mask-and-pattern trigger at a fixed place (Neural Cleanse's reversal)."""

    mask: torch.Tensor  # (H, W)
    pattern: torch.Tensor  # (C, H, W)

    def apply(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return blend(images, self.mask.to(images.device), self.pattern.to(images.device))


def trigger_variations(
    pattern: torch.Tensor, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Variations of a pattern for robustness checks (keys become ``eval/asr_<name>``)."""
    g = generator
    c, k, _ = pattern.shape
    out = {
        "noise": (pattern + 0.1 * torch.randn(pattern.shape, generator=g)).clamp(0, 1),
        "rot90": torch.rot90(pattern, 1, dims=(1, 2)),
        "invert": 1.0 - pattern,
    }
    flip = pattern.clone()
    flat = flip.view(c, -1)
    i = int(torch.randint(0, k * k, (1,), generator=g))
    flat[:, i] = 1.0 - flat[:, i]
    out["flip1"] = flip
    occl = pattern.clone()
    occl.view(c, -1)[:, int(torch.randint(0, k * k, (1,), generator=g))] = 0.5
    out["occlude1"] = occl
    return out
