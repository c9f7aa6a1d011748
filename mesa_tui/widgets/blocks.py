"""Titled blocks of text lines laid side by side and wrapped to the width: the layout the
trigger grid and the position map share (one block per beta)."""

from __future__ import annotations

from collections.abc import Iterable

from rich.console import RenderableType
from rich.text import Text
from textual.widget import Widget

Block = tuple[str, list[Text]]  # a title and the lines below it


def beta_order(beta: str) -> float:
    """Sort key of a beta label; a label that is no number sorts last."""
    try:
        return float(beta)
    except ValueError:
        return -1.0


def block_width(block: Block) -> int:
    title, lines = block
    return max(len(title), *(line.cell_len for line in lines)) + 2


def flow(blocks: Iterable[Block], width: int) -> list[Text]:
    """The blocks left to right, a new row of blocks whenever the next one would not fit."""
    out: list[Text] = []
    row: list[Block] = []
    used = 0
    for block in blocks:
        w = block_width(block)
        if row and used + w > width:
            out += join(row)
            row, used = [], 0
        row.append(block)
        used += w
    if row:
        out += join(row)
    return out


def join(row: list[Block]) -> list[Text]:
    """Blocks side by side, each with its title above, padded to a common height."""
    widths = [block_width(block) for block in row]
    height = max(len(lines) for _, lines in row)
    out = [Text() for _ in range(height + 1)]
    for (title, lines), w in zip(row, widths, strict=True):
        out[0].append(title.ljust(w), style="bold")
        for i in range(height):
            line = lines[i] if i < len(lines) else Text()
            out[i + 1].append_text(line)
            out[i + 1].append(" " * (w - line.cell_len))
    return out


class BlocksWidget(Widget):
    """A widget drawn as lines built by ``_build(width)``, built once per width and data
    (thousands of styled cells); ``_invalidate`` after new data."""

    _cached: tuple[int, list[Text]] | None = None

    def _build(self, width: int) -> list[Text]:
        raise NotImplementedError

    def _invalidate(self) -> None:
        self._cached = None

    def get_content_height(self, container, viewport, width: int) -> int:  # noqa: ANN001
        return max(1, len(self._layout(width)))

    def _layout(self, width: int) -> list[Text]:
        if self._cached is None or self._cached[0] != width:
            self._cached = (width, self._build(width))
        return self._cached[1]

    def render(self) -> RenderableType:
        return Text("\n").join(self._layout(self.size.width or 80))
