"""The idx format of the MNIST files: read (memory-mapped when plain) and write, strictly validated.

Layout: two zero bytes, a type byte, an ndim byte, ndim big-endian uint32 dims, then the elements,
big-endian, in C order. Arrays come back with big-endian dtypes where the type has more than one byte.
"""

from __future__ import annotations

import gzip
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

CODE_TO_DTYPE: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IdxFormatError(ValueError):
    """A file is not a valid idx array; the message names the file and the defect."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: not a valid idx file: {problem}")


def _parse_header(path: Path, head: bytes, total_size: int) -> tuple[np.dtype, tuple[int, ...], int]:
    if len(head) < 4:
        raise IdxFormatError(path, f"file is {total_size} bytes, too short for the 4-byte magic number")
    zero, code, ndim = struct.unpack(">HBB", head[:4])
    if zero != 0 or code not in CODE_TO_DTYPE:
        raise IdxFormatError(path, f"bad magic number {head[:4].hex()} (expected 0000 then a type byte in "
                                   f"{', '.join(f'{c:02x}' for c in CODE_TO_DTYPE)})")
    if ndim < 1:
        raise IdxFormatError(path, f"bad ndim {ndim} (expected at least 1)")
    offset = 4 + 4 * ndim
    if len(head) < offset:
        raise IdxFormatError(path, f"header truncated: ndim {ndim} needs {offset} header bytes, file has {total_size}")
    dims = struct.unpack(f">{ndim}I", head[4:offset])
    dtype = CODE_TO_DTYPE[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = total_size - offset
    if found < expected:
        raise IdxFormatError(path, f"data truncated: dims {dims} of {dtype} need {expected} bytes, file holds {found}")
    if found > expected:
        raise IdxFormatError(path, f"{found - expected} bytes of trailing data after the {expected} bytes "
                                   f"that dims {dims} need")
    return dtype, dims, offset


def _head_size() -> int:
    return 4 + 4 * 255


def read_idx(path: str | os.PathLike, mmap: bool = True, gzipped: bool | None = None) -> np.ndarray:
    """Read an idx array (read-only); plain files are memory-mapped when ``mmap``, ``.gz`` files are inflated."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such idx file")
    if gzipped if gzipped is not None else path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as handle:
                raw = handle.read()
        except (OSError, EOFError, zlib.error) as error:
            raise IdxFormatError(path, f"bad gzip data ({error})") from error
        dtype, shape, offset = _parse_header(path, raw[:_head_size()], len(raw))
        return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)
    total = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(_head_size())
    dtype, shape, offset = _parse_header(path, head, total)
    if not mmap or total == offset:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return np.frombuffer(handle.read(), dtype=dtype).reshape(shape)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` in idx format (gzipped if the name ends in .gz), atomically."""
    path = Path(path)
    array = np.asarray(array)
    big = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    codes = {dtype: code for code, dtype in CODE_TO_DTYPE.items()}
    if big not in codes:
        raise ValueError(f"idx format cannot store dtype {array.dtype} (supported: "
                         f"{', '.join(str(d) for d in CODE_TO_DTYPE.values())})")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"idx format stores 1..255 dimensions, got shape {array.shape}")
    payload = struct.pack(f">HBB{array.ndim}I", 0, codes[big], array.ndim, *array.shape) + \
        np.ascontiguousarray(array, dtype=big).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(gzip.compress(payload, mtime=0) if path.suffix == ".gz" else payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
