import gzip
import hashlib

import numpy as np
import pytest

from emcaps.data.download import ChecksumError, RemoteFile
from emcaps.data.norb_format import NorbFormatError, gunzip_norb, read_norb, validate_norb, write_norb
from emcaps.data.smallnorb import SPLIT_FILES, SmallNORB, download

from .http_server import FileServer

N = 20


def fake_split(root, split="test", gz=False, n=N, size=8):
    """Random smallNORB-shaped files: instance i % 5, elevation i % 9, azimuth 2*(i % 18), lighting i % 6."""
    rng = np.random.default_rng(0)
    i = np.arange(n)
    info = np.stack([i % 5, i % 9, 2 * (i % 18), i % 6], axis=1).astype(np.int32)
    arrays = {"dat": rng.integers(0, 256, (n, 2, size, size), dtype=np.uint8),
              "cat": (i % 5).astype(np.int32), "info": info}
    suffix = ".gz" if gz else ""
    for part, array in arrays.items():
        write_norb(root / (SPLIT_FILES[split][part] + suffix), array)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_reads_plain_and_gzipped(tmp_path, gz):
    arrays = fake_split(tmp_path, gz=gz)
    data = SmallNORB(tmp_path, "test")
    assert len(data) == N and data.image_size == 8
    image, label = data[7]
    assert image.shape == (2, 8, 8) and label == 2
    np.testing.assert_array_equal(image.numpy(), arrays["dat"][7])
    np.testing.assert_array_equal(data.azimuth, 20 * (np.arange(N) % 18))
    np.testing.assert_array_equal(data.elevation_degrees, 30 + 5 * (np.arange(N) % 9))
    right = SmallNORB(tmp_path, "test", cameras="right", instances=[2])
    assert len(right) == 4 and right[0][0].shape == (1, 8, 8)
    np.testing.assert_array_equal(right.images()[:, 0], arrays["dat"][2::5, 1])


def test_missing_and_inconsistent_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="emcaps data download smallnorb"):
        SmallNORB(tmp_path, "train")
    fake_split(tmp_path)
    write_norb(tmp_path / SPLIT_FILES["test"]["cat"], np.zeros(N - 1, np.int32))
    with pytest.raises(ValueError, match=r"expected uint8 images \(N=19"):
        SmallNORB(tmp_path, "test")
    with pytest.raises(ValueError, match="split must be"):
        SmallNORB(tmp_path, "validation")
    with pytest.raises(ValueError, match="cameras"):
        SmallNORB(tmp_path, "test", cameras="middle")


def test_validate_and_gunzip(tmp_path):
    array = np.arange(5000, dtype=np.int32)
    packed = write_norb(tmp_path / "a.mat.gz", array)
    assert validate_norb(packed) == (np.dtype("<i4"), (5000,))
    plain = gunzip_norb(packed, tmp_path / "a.mat")
    np.testing.assert_array_equal(read_norb(plain), array)
    cut = tmp_path / "cut.part"
    cut.write_bytes(gzip.compress(gzip.decompress(packed.read_bytes())[:-8]))
    with pytest.raises(NorbFormatError, match="data truncated"):
        validate_norb(cut, gzipped=True)
    with pytest.raises(NorbFormatError, match="bad gzip data"):
        gunzip_norb(plain, tmp_path / "b.mat")
    assert not (tmp_path / "b.mat").exists()


def _served(tmp_path):
    fake_split(tmp_path / "src", "train", gz=True)
    fake_split(tmp_path / "src", "test", gz=True)
    blobs = {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()}
    table = tuple(RemoteFile(n, len(b), hashlib.sha256(b).hexdigest()) for n, b in sorted(blobs.items()))
    return blobs, table


def test_download_unpacks_verified_files(tmp_path):
    blobs, table = _served(tmp_path)
    big = next(r.name for r in table if "-dat." in r.name)
    with FileServer(blobs, drop_after={big: 100}) as server:
        download(tmp_path / "norb", base_url=server.base_url, files=table, progress=False)
        assert (big, None) in server.requests and (big, "bytes=100-") in server.requests
        download(tmp_path / "norb", base_url=server.base_url, files=table, progress=False)
        assert len(server.requests) == 7
    assert sorted(p.name for p in (tmp_path / "norb").iterdir()) == sorted(n.removesuffix(".gz") for n in blobs)
    assert len(SmallNORB(tmp_path / "norb", "train")) == N


def test_download_rejects_a_corrupt_file(tmp_path):
    blobs, table = _served(tmp_path)
    name = table[2].name
    bad = bytearray(blobs[name])
    bad[len(bad) // 2] ^= 0x55
    with FileServer({**blobs, name: bytes(bad)}) as server, pytest.raises(ChecksumError, match="SHA-256"):
        download(tmp_path / "norb", base_url=server.base_url, files=table, progress=False)
    leftovers = [p.name for p in (tmp_path / "norb").iterdir()]
    assert not any(name.removesuffix(".gz") in p for p in leftovers)
