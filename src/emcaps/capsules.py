"""The capsule tensor type and patch extraction for capsule convolutions.

A layer of matrix capsules is a pair: a 4x4 pose matrix and a scalar activation per capsule. Keeping the
pair in one typed value lets every layer check what it is given instead of trusting a tuple's order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

POSE_SHAPE = (4, 4)


@dataclass(frozen=True)
class Capsules:
    """A grid of matrix capsules.

    pose:       (N, *grid, caps, 4, 4)
    activation: (N, *grid, caps), in [0, 1]
    """

    pose: Tensor
    activation: Tensor

    def __post_init__(self) -> None:
        p, a = self.pose, self.activation
        if p.dim() < 4 or tuple(p.shape[-2:]) != POSE_SHAPE:
            raise ValueError(f"Capsules.pose must have shape (N, *grid, caps, 4, 4), got {tuple(p.shape)}")
        if tuple(a.shape) != tuple(p.shape[:-2]):
            raise ValueError(
                f"Capsules.activation must have shape {tuple(p.shape[:-2])} to match the pose "
                f"{tuple(p.shape)}, got {tuple(a.shape)}"
            )

    @property
    def grid(self) -> tuple[int, ...]:
        """Spatial shape between batch and capsule-type dimensions (empty for class capsules)."""
        return tuple(self.pose.shape[1:-3])

    @property
    def types(self) -> int:
        """Number of capsule types per grid position."""
        return self.pose.shape[-3]

    def __iter__(self):
        # Lets `pose, activation = caps` work, as with a tuple.
        return iter((self.pose, self.activation))

    def to(self, *args, **kwargs) -> Capsules:
        return Capsules(self.pose.to(*args, **kwargs), self.activation.to(*args, **kwargs))


def conv_output_size(size: int, kernel: int, stride: int) -> int:
    """Output length of a valid (unpadded) convolution; raises if the kernel does not fit."""
    if kernel < 1 or stride < 1:
        raise ValueError(f"kernel and stride must be >= 1, got kernel={kernel}, stride={stride}")
    if kernel > size:
        raise ValueError(f"kernel {kernel} is larger than the input grid {size}")
    return (size - kernel) // stride + 1


def extract_patches(x: Tensor, kernel: int, stride: int) -> Tensor:
    """Sliding windows over the two grid dimensions, as a view (no copy).

    x: (N, H, W, *rest) -> (N, H', W', K, K, *rest)
    """
    if x.dim() < 3:
        raise ValueError(f"extract_patches needs (N, H, W, ...), got {tuple(x.shape)}")
    conv_output_size(x.shape[1], kernel, stride)
    conv_output_size(x.shape[2], kernel, stride)
    rest = x.dim() - 3
    # unfold appends the window dimension last: (N, H', W', *rest, K, K)
    p = x.unfold(1, kernel, stride).unfold(2, kernel, stride)
    return p.permute(0, 1, 2, rest + 3, rest + 4, *range(3, 3 + rest))


def gather_windows(x: Tensor, kernel: int, stride: int) -> Tensor:
    """The windows of `extract_patches`, copied out by one index_select over the flattened grid.

    x: (N, H, W, *rest) -> (N, H', W', K, K, *rest), contiguous. Why a copy: the layers need the windows
    contiguous anyway, and the backward of index_select (an index_add of whole rows) is much faster on a
    CPU than the backward of two unfolds.
    """
    if x.dim() < 3:
        raise ValueError(f"gather_windows needs (N, H, W, ...), got {tuple(x.shape)}")
    n, h, w = x.shape[:3]
    oh, ow = conv_output_size(h, kernel, stride), conv_output_size(w, kernel, stride)
    index = child_index_on(h, w, kernel, stride, x.device)                  # (H'*W'*K*K,)
    rows = x.reshape(n, h * w, *x.shape[3:]).index_select(1, index)         # (N, H'*W'*K*K, *rest)
    return rows.view(n, oh, ow, kernel, kernel, *x.shape[3:])


def child_index(height: int, width: int, kernel: int, stride: int) -> Tensor:
    """For each (output position, kernel offset) edge, the flat input position it reads.

    -> (H'*W'*K*K,) long, ordered as (y, x, ky, kx).
    """
    oh, ow = conv_output_size(height, kernel, stride), conv_output_size(width, kernel, stride)
    y = torch.arange(oh).view(oh, 1, 1, 1) * stride + torch.arange(kernel).view(1, 1, kernel, 1)
    x = torch.arange(ow).view(1, ow, 1, 1) * stride + torch.arange(kernel).view(1, 1, 1, kernel)
    return (y * width + x).reshape(-1)


@functools.lru_cache(maxsize=32)
def child_index_on(height: int, width: int, kernel: int, stride: int, device: torch.device) -> Tensor:
    """child_index on `device`, made once per grid and device: built afresh, each forward would copy it from the
    CPU (on a GPU, a synchronous copy a layer). Made outside inference mode, so a graph recorded later may save
    it. -> (H'*W'*K*K,) long; shared, never to be written to."""
    with torch.inference_mode(False):
        return child_index(height, width, kernel, stride).to(device)
