"""Data sets for emcaps: smallNORB, MNIST, the SynthNORB renderer, and the paper's preprocessing.

Data lives outside the repository: under ``default_data_dir()`` (``$EMCAPS_DATA_DIR``, else the
user's cache directory) unless a directory is given.
"""

from emcaps.data.cache import default_data_dir
from emcaps.data.download import ChecksumError, DownloadError
from emcaps.data.idx_format import IdxFormatError
from emcaps.data.mnist import MNIST
from emcaps.data.norb_format import NorbFormatError
from emcaps.data.smallnorb import CATEGORIES, SmallNORB
from emcaps.data.synthnorb import ensure_synthnorb, render_dataset, show

__all__ = [
    "CATEGORIES",
    "MNIST",
    "ChecksumError",
    "DownloadError",
    "IdxFormatError",
    "NorbFormatError",
    "SmallNORB",
    "default_data_dir",
    "ensure_synthnorb",
    "render_dataset",
    "show",
]
