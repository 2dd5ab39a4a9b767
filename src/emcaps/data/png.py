"""A minimal PNG writer (zlib + struct) so montages need neither Pillow nor matplotlib."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image, grey (H, W) or RGB (H, W, 3)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"expected uint8 (H, W) or (H, W, 3), got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    colour_type = 0 if image.ndim == 2 else 2
    rows = image.reshape(height, -1)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 6))
            + _chunk(b"IEND", b""))


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(image))
    return path


def montage(tiles: np.ndarray, gap: int = 2, background: int = 255) -> np.ndarray:
    """Tile a grid of uint8 images (rows, cols, H, W) into one image with ``gap``-pixel borders."""
    n_rows, n_cols, height, width = tiles.shape
    out = np.full((n_rows * (height + gap) + gap, n_cols * (width + gap) + gap), background, np.uint8)
    view = out[gap:, gap:].reshape(n_rows, height + gap, n_cols, width + gap)[:, :height, :, :width]
    view[...] = tiles.transpose(0, 2, 1, 3)
    return out
