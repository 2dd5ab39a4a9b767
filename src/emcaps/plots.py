"""Small PNG figures with numpy only: line plots, labelled heatmaps and image grids.

No plotting library is needed (matplotlib would be a heavy dependency for three kinds of figure).
Everything draws into an RGB canvas, uint8 (H, W, 3); text uses a built-in 3x5 pixel font, scaled.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
GREY = (200, 200, 200)
PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127))

# 3x5 glyphs: five rows, each a 3-bit number (4 = left pixel, 2 = middle, 1 = right).
_FONT = {
    "0": "75557", "1": "26227", "2": "71747", "3": "71717", "4": "55711", "5": "74717", "6": "74757",
    "7": "71111", "8": "75757", "9": "75717", "A": "25755", "B": "65656", "C": "34443", "D": "65556",
    "E": "74647", "F": "74644", "G": "34553", "H": "55755", "I": "72227", "J": "11152", "K": "55655",
    "L": "44447", "M": "57755", "N": "65555", "O": "25552", "P": "65644", "Q": "25563", "R": "65655",
    "S": "34216", "T": "72222", "U": "55557", "V": "55552", "W": "55775", "X": "55255", "Y": "55222",
    "Z": "71247", " ": "00000", ".": "00002", "-": "00700", "%": "51245", ":": "02020", "/": "11244",
    "(": "12221", ")": "42224", "_": "00007", "=": "07070", "+": "02720", ",": "00024", "?": "71202",
    "x": "00525", "#": "57575", "'": "22000",
}


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """Write uint8 (H, W) grey or (H, W, 3) RGB as an 8-bit PNG."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim == 2:
        colour = 0
    elif image.ndim == 3 and image.shape[2] == 3:
        colour = 2
    else:
        raise ValueError(f"write_png expects (H, W) or (H, W, 3) uint8, got {image.shape}")
    h, w = image.shape[:2]
    rows = image.reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()   # filter byte 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    path = Path(path)
    path.write_bytes(png)
    return path


def canvas(height: int, width: int, colour: tuple[int, int, int] = WHITE) -> np.ndarray:
    img = np.empty((height, width, 3), np.uint8)
    img[:] = colour
    return img


def text_width(text: str, scale: int = 2) -> int:
    return len(text) * 4 * scale


def draw_text(img: np.ndarray, x: int, y: int, text: str, colour=BLACK, scale: int = 2,
              anchor: str = "left") -> None:
    """Draw `text` with its top at row y; anchor 'left', 'centre' or 'right' at column x."""
    if anchor == "centre":
        x -= text_width(text, scale) // 2
    elif anchor == "right":
        x -= text_width(text, scale)
    for ch in text:
        glyph = _FONT.get(ch, _FONT.get(ch.upper(), _FONT["?"]))
        for row, bits in enumerate(glyph):
            for col in range(3):
                if int(bits) & (4 >> col):
                    y0, x0 = y + row * scale, x + col * scale
                    img[max(y0, 0):max(y0 + scale, 0), max(x0, 0):max(x0 + scale, 0)] = colour
        x += 4 * scale


def draw_line(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, colour, width: int = 2) -> None:
    """A segment in pixel coordinates, `width` pixels thick (sampled at half-pixel steps)."""
    n = int(max(abs(x1 - x0), abs(y1 - y0)) * 2) + 2
    xs = np.rint(np.linspace(x0, x1, n)).astype(int)
    ys = np.rint(np.linspace(y0, y1, n)).astype(int)
    h, w = img.shape[:2]
    for dy in range(-(width // 2), width - width // 2):
        for dx in range(-(width // 2), width - width // 2):
            r, c = ys + dy, xs + dx
            ok = (r >= 0) & (r < h) & (c >= 0) & (c < w)
            img[r[ok], c[ok]] = colour


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.1e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{v:.3g}"


def _ticks(lo: float, hi: float, n: int = 5) -> np.ndarray:
    """About n round numbers covering [lo, hi]."""
    span = hi - lo
    raw = span / max(n - 1, 1)
    mag = 10 ** np.floor(np.log10(raw))
    step = min((s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw), default=10 * mag)
    return np.arange(np.ceil(lo / step) * step, hi + step * 1e-9, step)


def line_plot(path: str | Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str = "",
              xlabel: str = "", ylabel: str = "", size: tuple[int, int] = (420, 640),
              ylim: tuple[float, float] | None = None) -> Path:
    """Polylines, one per named series of (x, y), with axes, ticks, a title and a legend."""
    height, width = size
    img = canvas(height, width)
    left, right, top, bottom = 70, 20, 36, 50
    pts = [(np.asarray(x, float), np.asarray(y, float)) for x, y in series.values()]
    finite = [(x[np.isfinite(y)], y[np.isfinite(y)]) for x, y in pts]
    xs = np.concatenate([x for x, _ in finite] or [np.zeros(1)])
    ys = np.concatenate([y for _, y in finite] or [np.zeros(1)])
    if xs.size == 0:
        xs, ys = np.zeros(1), np.zeros(1)
    x_lo, x_hi = float(xs.min()), float(xs.max())
    y_lo, y_hi = ylim if ylim is not None else (float(ys.min()), float(ys.max()))
    if x_hi == x_lo:
        x_hi = x_lo + 1
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    pad = 0.05 * (y_hi - y_lo) if ylim is None else 0.0
    y_lo, y_hi = y_lo - pad, y_hi + pad
    pw, ph = width - left - right, height - top - bottom

    def to_px(x, y):
        return left + (np.asarray(x) - x_lo) / (x_hi - x_lo) * pw, top + (y_hi - np.asarray(y)) / (y_hi - y_lo) * ph

    for t in _ticks(y_lo, y_hi):
        _, py = to_px(x_lo, t)
        draw_line(img, left, py, left + pw, py, GREY, 1)
        draw_text(img, left - 6, int(py) - 5, _fmt(float(t)), anchor="right")
    for t in _ticks(x_lo, x_hi):
        px, _ = to_px(t, y_lo)
        draw_line(img, px, top + ph, px, top + ph + 4, BLACK, 1)
        draw_text(img, int(px), top + ph + 8, _fmt(float(t)), anchor="centre")
    draw_line(img, left, top, left, top + ph, BLACK, 1)
    draw_line(img, left, top + ph, left + pw, top + ph, BLACK, 1)
    draw_text(img, width // 2, 8, title, anchor="centre")
    draw_text(img, left + pw // 2, height - 20, xlabel, anchor="centre")
    draw_text(img, 4, top - 20, ylabel)
    for k, ((name, _), (x, y)) in enumerate(zip(series.items(), finite)):
        colour = PALETTE[k % len(PALETTE)]
        px, py = to_px(x, y)
        for i in range(len(px) - 1):
            draw_line(img, px[i], py[i], px[i + 1], py[i + 1], colour, 2)
        if len(px) == 1:
            draw_line(img, px[0] - 2, py[0], px[0] + 2, py[0], colour, 4)
        ly = top + 8 + 16 * k
        lx = left + pw - text_width(name) - 30
        draw_line(img, lx, ly + 5, lx + 20, ly + 5, colour, 3)
        draw_text(img, lx + 26, ly, name)
    return write_png(path, img)


def heatmap(path: str | Path, matrix: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str],
            title: str = "", xlabel: str = "", ylabel: str = "", fmt: str = "{:.0f}",
            vmax: float | None = None) -> Path:
    """A labelled heatmap of matrix (R, C), white to dark blue, each cell's value written in it."""
    m = np.asarray(matrix, float)
    rows, cols = m.shape
    cell = int(np.clip(520 // max(rows, cols), 14, 60))
    label_w = max((text_width(str(s)) for s in row_labels), default=0) + 12
    scale_text = 2 if cell >= 28 else 1
    left, top = label_w + 24, 60
    width = max(left + cols * cell + 20, text_width(title) + 20)
    height = top + rows * cell + 12
    img = canvas(height, width)
    hi = vmax if vmax is not None else (np.nanmax(m) if np.isfinite(m).any() else 1.0)
    frac = np.clip(np.nan_to_num(m / (hi if hi > 0 else 1.0)), 0, 1)
    low, dark = np.array(WHITE, float), np.array((8, 48, 107), float)
    for r in range(rows):
        for c in range(cols):
            y0, x0 = top + r * cell, left + c * cell
            colour = low + (dark - low) * frac[r, c]
            img[y0:y0 + cell - 1, x0:x0 + cell - 1] = colour.astype(np.uint8)
            if np.isfinite(m[r, c]):
                ink = WHITE if frac[r, c] > 0.5 else BLACK
                text = fmt.format(m[r, c])
                if text_width(text, scale_text) < cell - 2:
                    draw_text(img, x0 + cell // 2, y0 + cell // 2 - 5 * scale_text // 2, text, ink, scale_text,
                              anchor="centre")
    for r, name in enumerate(row_labels):
        draw_text(img, left - 6, top + r * cell + cell // 2 - 5, str(name), anchor="right")
    for c, name in enumerate(col_labels):
        name = str(name)
        if text_width(name, 1) <= cell:
            draw_text(img, left + c * cell + cell // 2, top - 12, name, scale=1, anchor="centre")
    draw_text(img, width // 2, 8, title, anchor="centre")
    draw_text(img, left + cols * cell // 2, top - 30, xlabel, anchor="centre")
    draw_text(img, 4, top - 30, ylabel)
    return write_png(path, img)


def image_grid(path: str | Path, images: np.ndarray, columns: int = 10, scale: int = 2,
               labels: Sequence[str] | None = None) -> Path:
    """A montage of grey images (N, H, W), each stretched to its own range; optional label per row."""
    images = np.asarray(images, float)
    n, h, w = images.shape
    rows = -(-n // columns)
    label_w = max((text_width(s) for s in labels), default=0) + 8 if labels else 0
    gap = 2
    img = canvas(rows * (h * scale + gap) + gap, label_w + columns * (w * scale + gap) + gap)
    lo = images.reshape(n, -1).min(1).reshape(n, 1, 1)
    hi = images.reshape(n, -1).max(1).reshape(n, 1, 1)
    norm = ((images - lo) / np.where(hi > lo, hi - lo, 1.0) * 255).astype(np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        y0, x0 = gap + r * (h * scale + gap), label_w + gap + c * (w * scale + gap)
        big = np.kron(norm[i], np.ones((scale, scale), np.uint8))
        img[y0:y0 + h * scale, x0:x0 + w * scale] = big[..., None]
    for r, name in enumerate(labels or []):
        draw_text(img, 4, gap + r * (h * scale + gap) + h * scale // 2 - 5, name)
    return write_png(path, img)
