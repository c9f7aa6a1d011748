"""Sampled triggers drawn in true colour: one tile grid per beta, the original trigger beside them.

Each terminal cell shows two pixels with the upper half block (foreground = top pixel, background =
bottom pixel), so a 3x3 trigger is 3 cells wide and 1.5 cells tall: square on a usual terminal font.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from rich.style import Style
from rich.text import Text

from mesa_tui.widgets.blocks import BlocksWidget, beta_order, flow

BORDER = 0.5  # grey between tiles, as the paper's figure
MAX_TILES = 64


def tile_image(samples: np.ndarray, cols: int, scale: int = 1) -> np.ndarray:
    """(N, C, k, k) in [0, 1] -> an (H, W, 3) image of tiles with 1-pixel grey borders."""
    n, c, k, _ = samples.shape
    rgb = np.repeat(samples, 3, axis=1) if c == 1 else samples[:, :3]
    rgb = np.clip(np.nan_to_num(rgb, nan=0.0), 0.0, 1.0)
    if scale > 1:
        rgb = rgb.repeat(scale, axis=2).repeat(scale, axis=3)
        k *= scale
    rows = -(-n // cols)
    image = np.full((rows * (k + 1) + 1, cols * (k + 1) + 1, 3), BORDER, dtype=np.float32)
    for i in range(n):
        r, q = divmod(i, cols)
        y, x = 1 + r * (k + 1), 1 + q * (k + 1)
        image[y : y + k, x : x + k] = rgb[i].transpose(1, 2, 0)
    return image


def image_lines(image: np.ndarray) -> list[Text]:
    """An (H, W, 3) image as half-block lines."""
    if image.shape[0] % 2:
        image = np.concatenate([image, np.full((1, *image.shape[1:]), BORDER, np.float32)])
    pixels = (image * 255 + 0.5).astype(np.uint8)
    lines = []
    for y in range(0, pixels.shape[0], 2):
        line = Text()
        for top, bottom in zip(pixels[y], pixels[y + 1], strict=True):
            line.append(
                "▀",
                Style(
                    color=f"rgb({top[0]},{top[1]},{top[2]})",
                    bgcolor=f"rgb({bottom[0]},{bottom[1]},{bottom[2]})",
                ),
            )
        lines.append(line)
    return lines


class TriggerGrid(BlocksWidget):
    """Tiles of sampled triggers per beta; the widget lays the blocks out to its width."""

    DEFAULT_CSS = """
    TriggerGrid { height: auto; width: 1fr; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.by_beta: Mapping[str, np.ndarray] = {}
        self.original: np.ndarray | None = None

    def show(self, by_beta: Mapping[str, np.ndarray], original: np.ndarray | None) -> None:
        self.by_beta = by_beta
        self.original = original
        self._invalidate()
        self.refresh(layout=True)

    def _blocks(self, width: int) -> list[tuple[str, list[Text]]]:
        blocks: list[tuple[str, list[Text]]] = []
        if self.original is not None:
            blocks.append(("original", image_lines(tile_image(self.original[None], 1, scale=2))))
        betas = sorted(self.by_beta, key=beta_order, reverse=True)
        room = (width - 10) // max(1, len(betas)) - 2
        cols = max(3, min(8, (room - 1) // 4))
        for beta in betas:
            samples = self.by_beta[beta][: min(MAX_TILES, cols * cols)]
            if len(samples):
                blocks.append(
                    (
                        f"β={beta} ({len(self.by_beta[beta])})",
                        image_lines(tile_image(samples, cols)),
                    )
                )
        return blocks

    def _build(self, width: int) -> list[Text]:
        blocks = self._blocks(width)
        if not blocks:
            return [
                Text(
                    "no trigger samples yet (they appear when the search writes samples.npy)",
                    style="italic",
                )
            ]
        return flow(blocks, width)
