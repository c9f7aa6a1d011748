"""Where a search's triggers go and where they work, per beta, as heat maps: the learned position
distribution pi (where the search stamps) and, beside it, where the evaluated stamps sent their
image to the target (``landing.npy``, as shares of those hits: where valid triggers land).

One pixel per top-left offset of the patch (row, col), two pixels per terminal cell with the
upper half block, as the trigger tiles are drawn. Colours run from dark blue (no mass) through
teal and green to yellow (the largest cell), on the map's own scale; the legend under each map
gives the scale's top, the most likely offset and how spread the map is (its entropy as a share
of the uniform's: 1.0 means uniform, the paper's random places).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from rich.style import Style
from rich.text import Text

from mesa_tui.widgets.blocks import BlocksWidget, beta_order, flow

# Anchor colours of the scale (a viridis-like ramp), from no mass to the map's maximum.
RAMP = np.array(
    [
        [0.07, 0.04, 0.20],
        [0.15, 0.30, 0.55],
        [0.13, 0.57, 0.55],
        [0.37, 0.79, 0.38],
        [0.99, 0.91, 0.14],
    ],
    dtype=np.float32,
)
LEGEND_STEPS = 10


def colour(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB in [0, 1] along ``RAMP`` (any shape, a last axis of 3 added)."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0.0, 1.0)
    pos = v * (len(RAMP) - 1)
    low = np.floor(pos).astype(int).clip(0, len(RAMP) - 2)
    frac = (pos - low)[..., None]
    return RAMP[low] * (1 - frac) + RAMP[low + 1] * frac


def summary(probs: np.ndarray) -> dict[str, float]:
    """Top cell, its mass, and entropy as a share of the uniform's."""
    p = np.asarray(probs, dtype=np.float64)
    flat = p.reshape(-1) / max(float(p.sum()), 1e-300)
    best = int(flat.argmax())
    nz = flat[flat > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    ratio = entropy / np.log(flat.size) if flat.size > 1 else 1.0
    return {
        "row": best // p.shape[-1],
        "col": best % p.shape[-1],
        "mass": float(flat[best]),
        "ratio": ratio,
    }


def heat_lines(probs: np.ndarray) -> list[Text]:
    """The map (Hp, Wp) as half-block lines, scaled to its own maximum."""
    p = np.asarray(probs, dtype=np.float32)
    top = float(p.max()) if p.size else 0.0
    rgb = colour(p / top if top > 0 else p)
    if rgb.shape[0] % 2:
        rgb = np.concatenate([rgb, np.zeros((1, *rgb.shape[1:]), np.float32)])
    pixels = (rgb * 255 + 0.5).astype(np.uint8)
    lines = []
    for y in range(0, pixels.shape[0], 2):
        line = Text()
        for a, b in zip(pixels[y], pixels[y + 1], strict=True):
            line.append(
                "▀",
                Style(color=f"rgb({a[0]},{a[1]},{a[2]})", bgcolor=f"rgb({b[0]},{b[1]},{b[2]})"),
            )
        lines.append(line)
    return lines


def legend(probs: np.ndarray) -> list[Text]:
    """Two lines: the colour scale from 0 to the map's top, and the top offset and spread."""
    s = summary(probs)
    top = float(np.max(probs)) if np.size(probs) else 0.0
    bar = Text("0 ")
    for i in range(LEGEND_STEPS):
        r, g, b = (colour(np.float32(i / (LEGEND_STEPS - 1))) * 255 + 0.5).astype(int)
        bar.append("█", Style(color=f"rgb({r},{g},{b})"))
    bar.append(f" {top:.1%}")
    info = Text(f"top ({s['row']},{s['col']}) {s['mass']:.0%} · spread {s['ratio']:.2f}")
    return [bar, info]


def hit_shares(counts: np.ndarray) -> np.ndarray | None:
    """Landing counts as shares of every hit; None when no evaluated stamp hit the target."""
    c = np.asarray(counts, dtype=np.float64)
    total = float(c.sum())
    return (c / total).astype(np.float32) if total > 0 else None


class PositionMap(BlocksWidget):
    """Per beta the heat map of pi and of where its valid triggers land, laid out to the width."""

    DEFAULT_CSS = """
    PositionMap { height: auto; width: 1fr; margin-top: 1; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.by_beta: Mapping[str, np.ndarray] = {}
        self.landing: Mapping[str, np.ndarray] = {}
        self.display = False  # only searches with learned placement have a map

    def show(
        self, by_beta: Mapping[str, np.ndarray], landing: Mapping[str, np.ndarray] | None = None
    ) -> None:
        self.by_beta = by_beta
        self.landing = landing or {}
        self._invalidate()
        self.display = bool(by_beta)
        self.refresh(layout=True)

    def _build(self, width: int) -> list[Text]:
        if not self.by_beta:  # hidden then; a search at random places has no map
            return [Text("")]
        out = [  # two short lines: an 80-column terminal shows them whole
            Text("learned placement, patch top-left offsets:"),
            Text("π where the search stamps · hits where its valid triggers land"),
        ]
        blocks = []
        for beta in sorted(self.by_beta, key=beta_order, reverse=True):
            probs = self.by_beta[beta]
            size = f"{probs.shape[0]}x{probs.shape[1]}"
            blocks.append((f"β={beta} π {size}", heat_lines(probs) + legend(probs)))
            if beta in self.landing:
                blocks.append((f"β={beta} hits", self._hits(self.landing[beta])))
        return out + flow(blocks, width)

    @staticmethod
    def _hits(counts: np.ndarray) -> list[Text]:
        shares = hit_shares(counts)
        if shares is None:
            return [Text("no evaluated stamp"), Text("hit the target")]
        return heat_lines(shares) + legend(shares)
