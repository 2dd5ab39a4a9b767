"""Figures as PNG files, drawn with matplotlib: line plots, labelled heatmaps and image grids.

Figures use matplotlib's object API (`matplotlib.figure.Figure`, rendered to PNG by the Agg backend), not
pyplot: no display is needed and no global figure state is left behind. Each `*_figure` function returns
the Figure, so tests and callers can read its axes; the `line_plot`, `heatmap` and `image_grid` wrappers
draw and save in one call and return the PNG's path. Labels are lowercase and name their units.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

DPI = 100


def save(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as a PNG at `path` (parent folders made as needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=fig.dpi)
    return path


# ---------------------------------------------------------------------------------------------------------
# Line plots

def line_figure(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str = "", xlabel: str = "",
                ylabel: str = "", size: tuple[int, int] = (420, 640),
                ylim: tuple[float, float] | None = None) -> Figure:
    """One line per named series of (x, y); NaNs leave gaps. size is (height, width) in pixels."""
    fig = Figure(figsize=(size[1] / DPI, size[0] / DPI), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    marker = "o" if all(len(x) <= 40 for x, _ in series.values()) else None    # dots while they stay apart
    for name, (x, y) in series.items():
        ax.plot(np.asarray(x, float), np.asarray(y, float), marker=marker, markersize=4, label=name)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return fig


def line_plot(path: str | Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str = "",
              xlabel: str = "", ylabel: str = "", size: tuple[int, int] = (420, 640),
              ylim: tuple[float, float] | None = None) -> Path:
    """`line_figure` written to `path`."""
    return save(line_figure(series, title, xlabel, ylabel, size, ylim), path)


# ---------------------------------------------------------------------------------------------------------
# Heatmaps

def heatmap_figure(matrix: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], title: str = "",
                   xlabel: str = "", ylabel: str = "", fmt: str = "{:.0f}", vmax: float | None = None,
                   unit: str = "") -> Figure:
    """matrix (R, C) white to dark blue, each cell's value written in it (NaN cells grey, empty); the
    colour bar is labelled `unit`."""
    m = np.asarray(matrix, float)
    rows, cols = m.shape
    finite = np.isfinite(m)
    top = vmax if vmax is not None else (float(m[finite].max()) if finite.any() else 1.0)
    top = top if top > 0 else 1.0
    cell = 0.5 if max(rows, cols) <= 12 else 0.3                        # inches
    fig = Figure(figsize=(cols * cell + 2.6, rows * cell + 1.6), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    cmap = _colormap("Blues", bad="0.85")
    image = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=0, vmax=top, aspect="equal")
    fontsize = 8 if cell >= 0.5 else 6
    for r in range(rows):
        for c in range(cols):
            if finite[r, c]:
                ax.text(c, r, fmt.format(m[r, c]), ha="center", va="center", fontsize=fontsize,
                        color="white" if m[r, c] > 0.5 * top else "black")
    slanted = max((len(str(s)) for s in col_labels), default=0) > 3           # long names would overlap
    ax.set_xticks(range(cols), [str(s) for s in col_labels], rotation=45 if slanted else 0,
                  ha="right" if slanted else "center")
    ax.set_yticks(range(rows), [str(s) for s in row_labels])
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.colorbar(image, ax=ax, label=unit, shrink=0.8)
    return fig


def heatmap(path: str | Path, matrix: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str],
            title: str = "", xlabel: str = "", ylabel: str = "", fmt: str = "{:.0f}",
            vmax: float | None = None, unit: str = "") -> Path:
    """`heatmap_figure` written to `path`."""
    return save(heatmap_figure(matrix, row_labels, col_labels, title, xlabel, ylabel, fmt, vmax, unit), path)


# ---------------------------------------------------------------------------------------------------------
# Image grids

def montage(images: np.ndarray, columns: int, gap: int = 2) -> np.ndarray:
    """Tile images (N, H, W) row by row, `columns` to a row, into one (rows * (H + gap) + gap,
    columns * (W + gap) + gap) array; gaps and empty slots are NaN."""
    n, h, w = images.shape
    rows = -(-n // columns)
    out = np.full((rows * (h + gap) + gap, columns * (w + gap) + gap), np.nan)
    for i in range(n):
        r, c = divmod(i, columns)
        out[gap + r * (h + gap):gap + r * (h + gap) + h, gap + c * (w + gap):gap + c * (w + gap) + w] = images[i]
    return out


def image_grid_figure(images: np.ndarray, columns: int = 10, scale: int = 2,
                      labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
                      title: str = "", xlabel: str = "", ylabel: str = "",
                      value_range: tuple[float, float] | None = None) -> Figure:
    """Grey images (N, H, W) in a grid, `scale` screen pixels per image pixel; each image stretched to
    its own range unless `value_range` fixes one for all. Optional labels per row and per column."""
    images = np.asarray(images, float)
    n, h, w = images.shape
    if value_range is None:
        lo = images.reshape(n, -1).min(1).reshape(n, 1, 1)
        hi = images.reshape(n, -1).max(1).reshape(n, 1, 1)
        images = (images - lo) / np.where(hi > lo, hi - lo, 1.0)
    else:
        images = (images - value_range[0]) / (value_range[1] - value_range[0])
    gap = 2
    tiles = montage(images, columns, gap)
    left = 0.3 + (0.08 * max((len(s) for s in labels), default=0) if labels else 0) + (0.3 if ylabel else 0)
    bottom = 0.15 + (0.3 if col_labels is not None else 0) + (0.3 if xlabel else 0)
    top = 0.45 if title else 0.15
    width, height = tiles.shape[1] * scale / DPI, tiles.shape[0] * scale / DPI
    right = 0.3
    fig_w, fig_h = width + left + right, height + bottom + top
    fig = Figure(figsize=(fig_w, fig_h), dpi=DPI)
    ax = fig.add_axes((left / fig_w, bottom / fig_h, width / fig_w, height / fig_h))
    ax.imshow(np.ma.masked_invalid(tiles), cmap=_colormap("gray", bad="white"), vmin=0, vmax=1,
              interpolation="nearest")
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_yticks([gap + r * (h + gap) + (h - 1) / 2 for r in range(len(labels or []))], list(labels or []))
    ax.set_xticks([gap + c * (w + gap) + (w - 1) / 2 for c in range(len(col_labels or []))],
                  list(col_labels or []))
    ax.tick_params(length=0)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return fig


def image_grid(path: str | Path, images: np.ndarray, columns: int = 10, scale: int = 2,
               labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None, title: str = "",
               xlabel: str = "", ylabel: str = "", value_range: tuple[float, float] | None = None) -> Path:
    """`image_grid_figure` written to `path`."""
    return save(image_grid_figure(images, columns, scale, labels, col_labels, title, xlabel, ylabel,
                                  value_range), path)


def _colormap(name: str, bad: str):
    """A copy of matplotlib's colour map `name` that draws NaN / masked cells in colour `bad`."""
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad=bad)
