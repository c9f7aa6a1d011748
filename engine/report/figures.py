"""The report's figures: matplotlib's object API on the Agg canvas (headless, thread-safe, no
pyplot state). Every figure has a fixed size in pixels (``DPI`` dots per inch, no tight bounding
box), returned by the function that draws it, so a test can check the PNG it wrote."""

from __future__ import annotations

import contextlib
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from engine.report.collect import Series, to_rgb

DPI = 100
COLORS = (
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#637939",
)  # fmt: skip
# The paper's figure: pixels per trigger along x, and its fixed margins.
TRIGGER_PX = 36
TRIGGER_FIGURE_MIN_W = 900
TRIGGER_FIGURE_H = 560
PANEL_W, PANEL_H = 420, 380
GRID_PANEL_W, GRID_PANEL_H = 300, 340
EMBEDDING_W, EMBEDDING_H = 560, 500
HISTOGRAM_W, HISTOGRAM_H = 640, 400


def _figure(width_px: int, height_px: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> tuple[int, int]:
    fig.savefig(path, dpi=DPI, format="png")
    width, height = fig.canvas.get_width_height()
    return int(width), int(height)


def color_of(i: int) -> str:
    return COLORS[i % len(COLORS)]


def trigger_figure_size(n_triggers: int) -> tuple[int, int]:
    return max(TRIGGER_FIGURE_MIN_W, TRIGGER_PX * n_triggers + 240), TRIGGER_FIGURE_H


def asr_by_trigger(
    path: Path,
    triggers: Sequence[str],
    patterns: Sequence[np.ndarray | None],
    lines: Mapping[str, Sequence[float | None]],
    sorted_by: str | None,
    title: str,
    intervals: Mapping[str, Sequence[tuple[float, float] | None]] | None = None,
    colors: Mapping[str, int] | None = None,
) -> tuple[int, int]:
    """The paper's figure: ASR after repair per trigger (x, with each pattern drawn under its
    tick), one line per method, triggers sorted by the ``sorted_by`` method's ASR. ``intervals``
    (per method, per trigger: (low, high) or None) are drawn as error bars, each method's
    shifted a little along x so that they do not hide each other. ``colors``: each method's
    colour index (so that it keeps its colour across figures; default, its place in ``lines``)."""
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    width, height = trigger_figure_size(len(triggers))
    fig = _figure(width, height)
    # Fixed margins in pixels: room on the left for the axis and below for the thumbnails.
    left, right, bottom, top = 70 / width, 1 - 170 / width, 120 / height, 1 - 40 / height
    ax = fig.add_axes((left, bottom, right - left, top - bottom))
    x = np.arange(len(triggers))
    for i, (method, values) in enumerate(lines.items()):
        y = np.asarray([np.nan if v is None else 100 * v for v in values], dtype=np.float64)
        bars = (intervals or {}).get(method)
        shifted = x + (0.08 * (i - (len(lines) - 1) / 2) if intervals else 0.0)
        color = color_of((colors or {}).get(method, i))
        ax.plot(shifted, y, marker="o", markersize=3, linewidth=1.2, color=color, label=method)
        if bars:
            _error_bars(ax, shifted, y, bars, color)
    ax.set_xlim(-0.7, max(len(triggers) - 0.3, 0.7))
    ax.set_ylim(-2, 102)
    ax.set_ylabel("ASR after repair (%)")
    ax.set_xticks(x)
    ax.set_xticklabels([])
    ax.grid(True, axis="y", alpha=0.3)
    order = f", sorted by {sorted_by}" if sorted_by else ""
    # About 7 pixels a character at this size: a narrow figure's title wraps instead of clipping.
    ax.set_title(textwrap.fill(f"{title}{order}", max(40, (width - 240) // 7)), fontsize=10)
    ax.set_xlabel("trigger", labelpad=58)
    # Thumbnails: 60 % of the space per trigger, at most 40 pixels (zoom is in points).
    per_trigger = (right - left) * width / max(len(triggers) + 0.4, 1.0)
    zoom = min(0.6 * per_trigger, 40.0) / 9 * 72 / DPI
    for xi, (name, pattern) in enumerate(zip(triggers, patterns, strict=True)):
        if pattern is not None:
            img = np.repeat(np.repeat(to_rgb(pattern), 3, axis=0), 3, axis=1)
            box = AnnotationBbox(
                OffsetImage(img, zoom=zoom, interpolation="nearest"),
                (xi, 0),
                xycoords=("data", "axes fraction"),
                box_alignment=(0.5, 1.0),
                xybox=(0, -4),
                boxcoords="offset points",
                frameon=True,
                pad=0.1,
                bboxprops={"edgecolor": "#888888", "linewidth": 0.5},
            )
            ax.add_artist(box)
        if len(triggers) <= 60:
            ax.annotate(
                name.replace("bw:", "").replace("color:", "c"),
                (xi, 0),
                xycoords=("data", "axes fraction"),
                xytext=(0, -36),
                textcoords="offset points",
                ha="center",
                va="top",
                fontsize=6,
                rotation=90,
            )
    if lines:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return _save(fig, path)


def _error_bars(ax, x: np.ndarray, y: np.ndarray, bars, color: str) -> None:
    """Vertical bars from each (low, high) in fractions; a trigger without one gets none."""
    lo = np.asarray([np.nan if b is None else 100 * b[0] for b in bars], dtype=np.float64)
    hi = np.asarray([np.nan if b is None else 100 * b[1] for b in bars], dtype=np.float64)
    keep = ~(np.isnan(lo) | np.isnan(hi) | np.isnan(y))
    if keep.any():
        below, above = (y - lo)[keep], (hi - y)[keep]
        ax.errorbar(
            x[keep],
            y[keep],
            yerr=np.vstack([np.maximum(below, 0), np.maximum(above, 0)]),
            fmt="none",
            ecolor=color,
            elinewidth=0.8,
            capsize=1.5,
            alpha=0.8,
        )


def tile(samples: np.ndarray, cols: int = 8, scale: int = 4, gap: int = 1) -> np.ndarray:
    """Up to cols x cols samples (N, C, k, k) tiled on a grey background, (H, W, 3) in [0, 1]."""
    samples = np.asarray(samples, dtype=np.float32)[: cols * cols]
    if not len(samples):
        return np.full((8, 8, 3), 0.5, dtype=np.float32)
    k = samples.shape[-1]
    cell = k * scale
    rows = math.ceil(len(samples) / cols)
    used = min(cols, len(samples))
    canvas = np.full(
        (rows * (cell + gap) + gap, used * (cell + gap) + gap, 3), 0.5, dtype=np.float32
    )
    for i, s in enumerate(samples):
        r, c = divmod(i, cols)
        img = np.repeat(np.repeat(to_rgb(s), scale, axis=0), scale, axis=1)
        y, x0 = gap + r * (cell + gap), gap + c * (cell + gap)
        canvas[y : y + cell, x0 : x0 + cell] = img
    return canvas


def grids_size(n_betas: int, with_original: bool) -> tuple[int, int]:
    return GRID_PANEL_W * max(1, n_betas) + (160 if with_original else 0), GRID_PANEL_H


def search_grids(
    path: Path,
    samples: Mapping[str, np.ndarray],
    original: np.ndarray | None,
    captions: Mapping[str, str],
    title: str,
) -> tuple[int, int]:
    """The sampled triggers per beta (up to 64 each) and, when known, the original pattern."""
    betas = list(samples)
    width, height = grids_size(len(betas), original is not None)
    fig = _figure(width, height)
    panel_w = GRID_PANEL_W / width
    for i, beta in enumerate(betas or [""]):
        # Panels end at 0.77 of the height: the two-line titles and the figure's title above.
        ax = fig.add_axes((i * panel_w + 0.02 * panel_w, 0.05, 0.96 * panel_w, 0.72))
        ax.set_axis_off()
        if beta:
            ax.imshow(tile(samples[beta]), interpolation="nearest")
            ax.set_title(f"β={beta}\n{captions.get(beta, '')}", fontsize=9)
        else:
            ax.text(0.5, 0.5, "no samples on disk", ha="center", va="center")
    if original is not None:
        x0 = GRID_PANEL_W * max(1, len(betas)) / width
        ax = fig.add_axes((x0 + 20 / width, 0.35, 110 / width, 110 / height))
        ax.imshow(to_rgb(original), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("original", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def embedding(
    path: Path,
    projected: Mapping[str, np.ndarray],
    original: np.ndarray | None,
    title: str,
    axis_label: str = "PC",
) -> tuple[int, int]:
    """A 2-D scatter of every beta's samples (PCA or t-SNE coordinates); a star for the original."""
    fig = _figure(EMBEDDING_W, EMBEDDING_H)
    ax = fig.add_axes((0.13, 0.11, 0.82, 0.8))
    for i, (beta, xy) in enumerate(projected.items()):
        ax.scatter(xy[:, 0], xy[:, 1], s=5, alpha=0.5, color=color_of(i), label=f"β={beta}")
    if original is not None:
        ax.scatter(
            original[:, 0], original[:, 1], marker="*", s=220, color="black", label="original"
        )
    ax.set_xlabel(f"{axis_label} 1")
    ax.set_ylabel(f"{axis_label} 2")
    ax.set_title(title, fontsize=10)
    if projected:
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no samples on disk", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, path)


def panels_size(n_panels: int) -> tuple[int, int]:
    return PANEL_W * max(1, n_panels), PANEL_H


def curves(
    path: Path,
    panels: Sequence[tuple[str, str, Sequence[tuple[str, Series]]]],
    title: str,
    xlabel: str | Sequence[str] = "step",
) -> tuple[int, int]:
    """Side-by-side line charts. Each panel: (title, y label, [(group, series), ...]); a group
    keeps one colour and one legend entry however many lines it has."""
    width, height = panels_size(len(panels))
    fig = _figure(width, height)
    groups: dict[str, str] = {}
    for panel in panels:
        for group, _ in panel[2]:
            groups.setdefault(group, color_of(len(groups)))
    n = max(1, len(panels))
    for i, (name, ylabel, lines) in enumerate(panels):
        ax = fig.add_axes((i / n + 0.16 / n, 0.14, 0.78 / n, 0.72))
        shown: set[str] = set()
        for group, s in lines:
            ax.plot(
                s.steps,
                s.values,
                color=groups[group],
                linewidth=1.0,
                alpha=0.8 if len(lines) <= 12 else 0.4,
                marker="o" if len(s) <= 20 else None,
                markersize=2.5,
                label=group if group not in shown else None,
            )
            shown.add(group)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_xlabel(xlabel if isinstance(xlabel, str) else xlabel[i], fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        if not lines:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
        elif i == len(panels) - 1 and 1 < len(groups) <= 12:
            ax.legend(loc="best", fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def validity_histogram(
    path: Path, histograms: Mapping[str, Sequence[int]], title: str
) -> tuple[int, int]:
    """Per beta, how many sampled triggers reach each own-ASR bin over [0, 1]; the dashed line
    is the beta (a sample at or above it counts as valid)."""
    fig = _figure(HISTOGRAM_W, HISTOGRAM_H)
    ax = fig.add_axes((0.1, 0.13, 0.86, 0.77))
    betas = list(histograms)
    width = 0.8 / max(1, len(betas))
    for i, beta in enumerate(betas):
        counts = np.asarray(histograms[beta], dtype=np.float64)
        bins = len(counts)
        share = counts / max(counts.sum(), 1.0)
        centres = (np.arange(bins) + 0.5) / bins
        offset = (i - (len(betas) - 1) / 2) * width / bins
        ax.bar(
            centres + offset,
            share,
            width=width / bins,
            color=color_of(i),
            label=f"β={beta}",
            alpha=0.85,
        )
        with contextlib.suppress(ValueError):  # a beta label that is not a number
            ax.axvline(float(beta), color=color_of(i), linestyle="--", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("own ASR of a sampled trigger (share of stamped held-in images → target)")
    ax.set_ylabel("share of samples")
    ax.set_title(title, fontsize=10)
    if betas:
        ax.legend(loc="upper left", fontsize=8)
    else:
        ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, path)
