import io
import struct
import zlib

import numpy as np
import pytest

from emcaps.data.png import encode_png, montage
from emcaps.data.progress import Progress


def test_progress_bar_text():
    stream = io.StringIO()
    with Progress(10, desc="render", stream=stream, interval=0.0, unit=" img") as bar:
        bar.update(4)
        bar.update(6)
    text = stream.getvalue()
    assert "render [" in text and "10/10 img" in text and text.endswith("\n")
    silent = io.StringIO()
    with Progress(3, stream=silent, enabled=False) as bar:
        bar.update(3)
    assert silent.getvalue() == ""


def _decode(png: bytes) -> tuple[int, int, int, bytes]:
    width, height, depth, colour = struct.unpack(">IIBB", png[16:26])
    chunks, at = b"", 8
    while at < len(png):
        (length,) = struct.unpack(">I", png[at:at + 4])
        kind, data = png[at + 4:at + 8], png[at + 8:at + 8 + length]
        assert struct.unpack(">I", png[at + 8 + length:at + 12 + length])[0] == zlib.crc32(kind + data)
        if kind == b"IDAT":
            chunks += data
        at += 12 + length
    assert depth == 8
    return width, height, colour, zlib.decompress(chunks)


@pytest.mark.parametrize("shape, colour", [((5, 7), 0), ((5, 7, 3), 2)])
def test_png_round_trip(shape, colour):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    width, height, got_colour, raw = _decode(encode_png(image))
    assert (width, height, got_colour) == (7, 5, colour)
    rows = np.frombuffer(raw, np.uint8).reshape(5, -1)
    assert (rows[:, 0] == 0).all()
    np.testing.assert_array_equal(rows[:, 1:].reshape(shape), image)


def test_png_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4), np.float32))


def test_montage_layout():
    tiles = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)
    out = montage(tiles, gap=1, background=255)
    assert out.shape == (2 * 5 + 1, 3 * 5 + 1)
    np.testing.assert_array_equal(out[6:10, 11:15], tiles[1, 2])
    assert (out[0] == 255).all() and (out[:, 5] == 255).all()
