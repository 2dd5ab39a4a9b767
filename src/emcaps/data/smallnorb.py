"""The smallNORB data set (LeCun, Huang, Bottou 2004) as a torch Dataset, with the paper's viewpoint splits.

Each row is a stereo pair of 96x96 grey images of one of 50 toys (5 categories x 10 instances) at one
of 18 azimuths, 9 elevations and 6 lightings. The same class reads SynthNORB, which is written in
identical files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from emcaps.data.cache import default_data_dir
from emcaps.data.download import RemoteFile, fetch
from emcaps.data.norb_format import NorbFormatError, gunzip_norb, read_norb, validate_norb

CATEGORIES = ("animal", "human", "airplane", "truck", "car")
TRAIN_INSTANCES = (4, 6, 7, 8, 9)
TEST_INSTANCES = (0, 1, 2, 3, 5)
SPLIT_FILES = {
    split: {part: f"smallnorb-5x{ids}x9x18x6x2x96x96-{name}-{part}.mat" for part in ("dat", "cat", "info")}
    for split, ids, name in (("train", "46789", "training"), ("test", "01235", "testing"))
}
ELEVATIONS_DEG = tuple(30 + 5 * i for i in range(9))
FAMILIAR_AZIMUTHS = (300, 320, 340, 0, 20, 40)
NOVEL_AZIMUTHS = tuple(range(60, 281, 20))
FAMILIAR_ELEVATIONS = (0, 1, 2)
NOVEL_ELEVATIONS = (3, 4, 5, 6, 7, 8)

SMALLNORB_URL = "https://cs.nyu.edu/~yann/data/norb-v1.0-small/"
# Sizes and SHA-256 of the official gzipped files, as recorded by TensorFlow Datasets
# (tensorflow_datasets/url_checksums/smallnorb.txt).
SMALLNORB_FILES = (
    RemoteFile("smallnorb-5x46789x9x18x6x2x96x96-training-dat.mat.gz", 131896188,
               "5ffd6272a07d32695ee1082a26a41a93a37aab8c28da047f8c34ed348d214873"),
    RemoteFile("smallnorb-5x46789x9x18x6x2x96x96-training-cat.mat.gz", 348,
               "2784e542c1922060691090952b6cd6278879a216c90f81476f0f00256d42cdaa"),
    RemoteFile("smallnorb-5x46789x9x18x6x2x96x96-training-info.mat.gz", 71052,
               "de7eb932ebe7a4ee16217fead60660d0eb3d23632c2f4d1c51f88c501c17bf32"),
    RemoteFile("smallnorb-5x01235x9x18x6x2x96x96-testing-dat.mat.gz", 130799817,
               "cf7104eed3e51174d2f65b66d1e5878b9da233b886f161b0d88f4510ba2c7474"),
    RemoteFile("smallnorb-5x01235x9x18x6x2x96x96-testing-cat.mat.gz", 347,
               "ecaf6d5bb8c3bc5eab9cf0258f6d2198dd474e016e374836fc097f2e5ff509ff"),
    RemoteFile("smallnorb-5x01235x9x18x6x2x96x96-testing-info.mat.gz", 10428,
               "16adf314226327ee006d1a44db8cfef52773c06c829951d5653a9f6f310248a2"),
)


def _find(root: Path, name: str) -> Path:
    for candidate in (root / name, root / (name + ".gz")):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{root}: missing {name} (or {name}.gz); fetch smallNORB with `emcaps data download smallnorb` "
        f"or render SynthNORB with `emcaps data synth --out DIR`"
    )


def _values(selection, familiar: tuple[int, ...], novel: tuple[int, ...], what: str) -> tuple[int, ...] | None:
    if selection is None:
        return None
    if isinstance(selection, str):
        if selection not in ("familiar", "novel"):
            raise ValueError(f"{what} filter must be 'familiar', 'novel', a list or None, got {selection!r}")
        return familiar if selection == "familiar" else novel
    return tuple(int(v) for v in selection)


def _cameras(cameras) -> tuple[int, ...]:
    named = {"both": (0, 1), "left": (0,), "right": (1,), 0: (0,), 1: (1,)}
    if isinstance(cameras, (str, int)):
        if cameras not in named:
            raise ValueError(f"cameras must be 'both', 'left', 'right', 0, 1 or a list of them, got {cameras!r}")
        return named[cameras]
    chosen = tuple(int(c) for c in cameras)
    if not chosen or any(c not in (0, 1) for c in chosen):
        raise ValueError(f"cameras must be a non-empty list of 0 and 1, got {cameras!r}")
    return chosen


class SmallNORB(Dataset):
    """One split of smallNORB (or SynthNORB) from ``root``; items are (uint8 image (C, H, W), label).

    ``root`` defaults to ``smallnorb`` under the data cache (where ``emcaps data download smallnorb`` puts it).

    ``cameras``: 'both' (2 channels, the paper's input), 'left' or 'right'. ``azimuths`` (degrees) and
    ``elevations`` (indices 0..8) filter the rows: 'familiar' / 'novel' give the paper's viewpoint
    splits, a list picks values, None keeps all. ``transform`` is applied to each image tensor.
    Plain files are memory-mapped, so opening is instant and rows are read on demand.
    """

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train", cameras="both",
                 azimuths: str | Iterable[int] | None = None, elevations: str | Iterable[int] | None = None,
                 lightings: Iterable[int] | None = None, instances: Iterable[int] | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if split not in SPLIT_FILES:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.root = Path(root) if root is not None else default_data_dir() / "smallnorb"
        self.split = split
        self.cameras = _cameras(cameras)
        self.transform = transform
        files = {part: _find(self.root, name) for part, name in SPLIT_FILES[split].items()}
        self._images = read_norb(files["dat"])
        labels = np.asarray(read_norb(files["cat"]))
        info = np.asarray(read_norb(files["info"]))
        n = len(labels)
        if self._images.ndim != 4 or self._images.shape[:2] != (n, 2) or self._images.dtype != np.uint8:
            raise NorbFormatError(files["dat"], f"expected uint8 images (N={n}, 2, H, W), got "
                                                f"{self._images.dtype} {self._images.shape}")
        if labels.shape != (n,) or labels.dtype.kind != "i":
            raise NorbFormatError(files["cat"],
                                  f"expected int labels of shape ({n},), got {labels.dtype} {labels.shape}")
        if info.shape != (n, 4) or info.dtype.kind != "i":
            raise NorbFormatError(files["info"], f"expected int info of shape ({n}, 4), got {info.dtype} {info.shape}")
        keep = np.ones(n, dtype=bool)
        azimuth_deg = info[:, 2].astype(np.int64) * 10
        for column, chosen in (
            (azimuth_deg, _values(azimuths, FAMILIAR_AZIMUTHS, NOVEL_AZIMUTHS, "azimuth")),
            (info[:, 1], _values(elevations, FAMILIAR_ELEVATIONS, NOVEL_ELEVATIONS, "elevation")),
            (info[:, 3], None if lightings is None else tuple(lightings)),
            (info[:, 0], None if instances is None else tuple(instances)),
        ):
            if chosen is not None:
                keep &= np.isin(column, chosen)
        self.indices = np.flatnonzero(keep)
        self.labels = labels[self.indices].astype(np.int64)
        self.instance = info[self.indices, 0].astype(np.int64)
        self.elevation = info[self.indices, 1].astype(np.int64)
        self.azimuth = azimuth_deg[self.indices]
        self.lighting = info[self.indices, 3].astype(np.int64)

    @property
    def elevation_degrees(self) -> np.ndarray:
        return 30 + 5 * self.elevation

    @property
    def image_size(self) -> int:
        return int(self._images.shape[-1])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """(image uint8 (C, H, W), label); C = number of cameras chosen."""
        image = torch.from_numpy(np.array(self._images[self.indices[i], list(self.cameras)]))
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i])

    def images(self) -> np.ndarray:
        """All selected images at once, uint8 (N, C, H, W) (reads them into memory)."""
        rows = self._images[self.indices]
        return np.ascontiguousarray(rows[:, list(self.cameras)])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images uint8 (N, C, H, W), labels int64 (N,)) for batch-wise preprocessing."""
        return torch.from_numpy(self.images()), torch.from_numpy(self.labels)


def download(root: str | os.PathLike, base_url: str = SMALLNORB_URL, progress: bool = True,
             files: tuple[RemoteFile, ...] | None = None) -> Path:
    """Fetch the six official files into ``root`` and unpack them to plain, memory-mappable ``.mat`` files.

    Each download is checked against its recorded size and SHA-256, then its gzip stream is read through
    and its NORB header checked against the decompressed length, before it gets its final name. Files
    already unpacked are skipped. After unpacking, the ``.gz`` is deleted to save disk space.
    """
    root = Path(root)
    base = base_url if base_url.endswith("/") else base_url + "/"
    for remote in SMALLNORB_FILES if files is None else files:
        plain = root / remote.name.removesuffix(".gz")
        if plain.is_file():
            continue
        packed = fetch(base + remote.name, root / remote.name, size=remote.size, sha256=remote.sha256,
                       verify=lambda part: validate_norb(part, gzipped=True), progress=progress)
        gunzip_norb(packed, plain)
        packed.unlink()
    return root
