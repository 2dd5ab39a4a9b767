"""The NORB binary matrix format (the container of the smallNORB files).

Layout, all little-endian: int32 magic (the element type), int32 ndim, then ``max(3, ndim)`` int32
dims (dims past ``ndim`` are padding, conventionally 1, and ignored), then the elements in C order.
Plain files are memory-mapped so a 450 MB image file costs nothing until it is read; gzipped files
(``.gz``) cannot be mapped and are decompressed into memory.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

MAGIC_TO_DTYPE: dict[int, np.dtype] = {
    0x1E3D4C55: np.dtype("u1"),
    0x1E3D4C56: np.dtype("<i2"),
    0x1E3D4C54: np.dtype("<i4"),
    0x1E3D4C51: np.dtype("<f4"),
    0x1E3D4C53: np.dtype("<f8"),
}
DTYPE_TO_MAGIC: dict[np.dtype, int] = {dtype: magic for magic, dtype in MAGIC_TO_DTYPE.items()}
MAX_NDIM = 32


class NorbFormatError(ValueError):
    """A file is not a valid NORB binary matrix; the message names the file and the defect."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: not a valid NORB matrix file: {problem}")


def _parse_header(path: Path, head: bytes, total_size: int) -> tuple[np.dtype, tuple[int, ...], int]:
    """Validate the header at the start of ``head``; return (dtype, shape, data offset)."""
    if len(head) < 8:
        raise NorbFormatError(path, f"file is {total_size} bytes, too short for the 8-byte header")
    magic, ndim = struct.unpack("<ii", head[:8])
    if magic not in MAGIC_TO_DTYPE:
        known = ", ".join(f"{m:#010x}" for m in MAGIC_TO_DTYPE)
        raise NorbFormatError(path, f"bad magic number {magic & 0xFFFFFFFF:#010x} (expected one of {known})")
    if not 1 <= ndim <= MAX_NDIM:
        raise NorbFormatError(path, f"bad ndim {ndim} (expected 1..{MAX_NDIM})")
    n_dims_stored = max(3, ndim)
    offset = 8 + 4 * n_dims_stored
    if len(head) < offset:
        raise NorbFormatError(
            path, f"header truncated: ndim {ndim} needs {offset} header bytes, file has {total_size}"
        )
    dims = struct.unpack(f"<{n_dims_stored}i", head[8:offset])[:ndim]
    if any(d < 0 for d in dims):
        raise NorbFormatError(path, f"negative dimension in {dims}")
    dtype = MAGIC_TO_DTYPE[magic]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = total_size - offset
    if found < expected:
        raise NorbFormatError(
            path,
            f"data truncated: dims {tuple(dims)} of {dtype} need {expected} bytes, file holds {found}",
        )
    if found > expected:
        raise NorbFormatError(
            path, f"{found - expected} bytes of trailing data after the {expected} bytes that dims {tuple(dims)} need"
        )
    return dtype, tuple(dims), offset


def _read_gzip(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as handle:
            return handle.read()
    except (OSError, EOFError, zlib.error) as error:
        raise NorbFormatError(path, f"bad gzip data ({error})") from error


def read_norb(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
    """Read a NORB matrix: a read-only array, memory-mapped for plain files when ``mmap``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such NORB matrix file")
    if path.suffix == ".gz":
        raw = _read_gzip(path)
        dtype, shape, offset = _parse_header(path, raw[: 8 + 4 * MAX_NDIM], len(raw))
        array = np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)
        return array
    total = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8 + 4 * MAX_NDIM)
    dtype, shape, offset = _parse_header(path, head, total)
    if not mmap or total == offset:
        with open(path, "rb") as handle:
            handle.seek(offset)
            array = np.frombuffer(handle.read(), dtype=dtype).reshape(shape)
        return array
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def read_norb_header(path: str | os.PathLike) -> tuple[np.dtype, tuple[int, ...]]:
    """Validate a file and return its (dtype, shape) without reading the elements."""
    path = Path(path)
    if path.suffix == ".gz":
        array = read_norb(path)
        return array.dtype, array.shape
    total = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8 + 4 * MAX_NDIM)
    dtype, shape, _ = _parse_header(path, head, total)
    return dtype, shape


def encode_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The header bytes for an array of ``dtype`` and ``shape``."""
    dtype = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).itemsize > 1 else np.dtype(dtype)
    if dtype not in DTYPE_TO_MAGIC:
        known = ", ".join(str(d) for d in DTYPE_TO_MAGIC)
        raise ValueError(f"NORB format cannot store dtype {dtype} (supported: {known})")
    if not 1 <= len(shape) <= MAX_NDIM:
        raise ValueError(f"NORB format stores 1..{MAX_NDIM} dimensions, got shape {shape}")
    dims = list(shape) + [1] * (3 - len(shape))
    return struct.pack(f"<ii{len(dims)}i", DTYPE_TO_MAGIC[dtype], len(shape), *dims)


def write_norb(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` as a NORB matrix (gzipped if the name ends in .gz), atomically."""
    path = Path(path)
    array = np.asarray(array)
    header = encode_header(array.dtype, array.shape)
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw_handle:
            if path.suffix == ".gz":
                with gzip.GzipFile(fileobj=raw_handle, mode="wb", mtime=0) as handle:
                    handle.write(header)
                    handle.write(data)
            else:
                raw_handle.write(header)
                raw_handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def create_norb_memmap(path: str | os.PathLike, dtype: np.dtype, shape: tuple[int, ...]) -> np.memmap:
    """Create a plain NORB file of zeros and return it as a writable memmap, to fill in place."""
    path = Path(path)
    if path.suffix == ".gz":
        raise ValueError(f"{path}: cannot memory-map a gzipped file; write it with write_norb")
    header = encode_header(dtype, shape)
    dtype = MAGIC_TO_DTYPE[struct.unpack("<i", header[:4])[0]]
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(header)
        handle.truncate(len(header) + size)
    return np.memmap(path, dtype=dtype, mode="r+", offset=len(header), shape=tuple(shape))


def validate_norb(path: str | os.PathLike, gzipped: bool | None = None,
                  chunk_size: int = 1 << 20) -> tuple[np.dtype, tuple[int, ...]]:
    """Check a whole file (header, size, gzip stream) without holding it in memory; return (dtype, shape).

    ``gzipped`` defaults to the file name (``.gz``); pass it for names like ``x.mat.gz.part``.
    """
    path = Path(path)
    if gzipped is None:
        gzipped = path.suffix == ".gz"
    if not gzipped:
        return read_norb_header(path)
    head = b""
    total = 0
    try:
        with gzip.open(path, "rb") as handle:
            while block := handle.read(chunk_size):
                if len(head) < 8 + 4 * MAX_NDIM:
                    head += block[: 8 + 4 * MAX_NDIM - len(head)]
                total += len(block)
    except (OSError, EOFError, zlib.error) as error:
        raise NorbFormatError(path, f"bad gzip data ({error})") from error
    dtype, shape, _ = _parse_header(path, head, total)
    return dtype, shape


def gunzip_norb(source: str | os.PathLike, dest: str | os.PathLike, chunk_size: int = 1 << 20) -> Path:
    """Decompress a gzipped NORB file to a plain (memory-mappable) one, validated, written atomically."""
    source, dest = Path(source), Path(dest)
    validate_norb(source, gzipped=True)
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        with gzip.open(source, "rb") as reader, open(tmp, "wb") as writer:
            shutil.copyfileobj(reader, writer, chunk_size)
            writer.flush()
            os.fsync(writer.fileno())
        read_norb_header(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
