import gzip
import struct

import numpy as np
import pytest

from emcaps.data.norb_format import (
    NorbFormatError,
    create_norb_memmap,
    read_norb,
    read_norb_header,
    write_norb,
)

DTYPES = [np.uint8, np.int16, np.int32, np.float32, np.float64]
MAGICS = {np.uint8: 0x1E3D4C55, np.int16: 0x1E3D4C56, np.int32: 0x1E3D4C54, np.float32: 0x1E3D4C51,
          np.float64: 0x1E3D4C53}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("suffix", [".mat", ".mat.gz"])
@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 4), (2, 2, 3, 5)])
def test_round_trip(tmp_path, dtype, suffix, shape):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal(shape) * 100).astype(dtype)
    path = write_norb(tmp_path / f"m{suffix}", array)
    back = read_norb(path)
    assert back.dtype == np.dtype(dtype) and back.shape == shape
    np.testing.assert_array_equal(back, array)
    assert read_norb_header(path) == (np.dtype(dtype), shape)


@pytest.mark.parametrize("dtype", DTYPES)
def test_header_layout_matches_spec(tmp_path, dtype):
    path = write_norb(tmp_path / "m.mat", np.zeros((5,), dtype))
    raw = path.read_bytes()
    magic, ndim, d0, d1, d2 = struct.unpack("<iiiii", raw[:20])
    assert (magic, ndim, d0, d1, d2) == (MAGICS[dtype], 1, 5, 1, 1)
    assert len(raw) == 20 + 5 * np.dtype(dtype).itemsize


def test_plain_file_is_memory_mapped(tmp_path):
    path = write_norb(tmp_path / "m.mat", np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    assert isinstance(read_norb(path), np.memmap)
    assert not isinstance(read_norb(path, mmap=False), np.memmap)


def test_create_memmap_then_read(tmp_path):
    out = create_norb_memmap(tmp_path / "m.mat", np.int32, (4, 2))
    out[:] = np.arange(8).reshape(4, 2)
    out.flush()
    del out
    np.testing.assert_array_equal(read_norb(tmp_path / "m.mat"), np.arange(8).reshape(4, 2))


def _write_raw(tmp_path, raw, gz=False):
    path = tmp_path / ("bad.mat.gz" if gz else "bad.mat")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def _header(magic, ndim, dims):
    return struct.pack(f"<ii{len(dims)}i", magic, ndim, *dims)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "raw, message",
    [
        (_header(0x12345678, 1, [2, 1, 1]) + b"ab", "bad magic number 0x12345678"),
        (_header(0x1E3D4C55, 0, [2, 1, 1]) + b"ab", "bad ndim 0"),
        (_header(0x1E3D4C55, -3, [2, 1, 1]) + b"ab", "bad ndim -3"),
        (_header(0x1E3D4C55, 99, [2, 1, 1]) + b"ab", "bad ndim 99"),
        (_header(0x1E3D4C55, 2, [1000, 1000, 1]) + b"ab", "data truncated"),
        (_header(0x1E3D4C54, 1, [4, 1, 1]) + b"\0" * 15, "data truncated"),
        (_header(0x1E3D4C55, 1, [2, 1, 1]) + b"abc", "1 bytes of trailing data"),
        (_header(0x1E3D4C55, 1, [-2, 1, 1]), "negative dimension"),
        (struct.pack("<i", 0x1E3D4C55), "too short for the 8-byte header"),
        (_header(0x1E3D4C55, 5, [2, 1, 1]), "header truncated"),
    ],
)
def test_corruption_is_reported_with_file_name(tmp_path, raw, message, gz):
    path = _write_raw(tmp_path, raw, gz)
    with pytest.raises(NorbFormatError, match=message) as info:
        read_norb(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_gzip(tmp_path):
    path = tmp_path / "bad.mat.gz"
    path.write_bytes(b"this is not gzip at all")
    with pytest.raises(NorbFormatError, match="bad gzip data") as info:
        read_norb(path)
    assert str(path) in str(info.value)


def test_truncated_gzip_stream(tmp_path):
    good = write_norb(tmp_path / "good.mat.gz", np.arange(1000, dtype=np.int32))
    path = tmp_path / "cut.mat.gz"
    path.write_bytes(good.read_bytes()[:-30])
    with pytest.raises(NorbFormatError, match="bad gzip data"):
        read_norb(path)


def test_unsupported_dtype_rejected(tmp_path):
    with pytest.raises(ValueError, match="cannot store dtype"):
        write_norb(tmp_path / "m.mat", np.zeros(3, np.int64))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.mat"):
        read_norb(tmp_path / "nope.mat")
