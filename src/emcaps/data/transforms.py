"""The paper's smallNORB preprocessing, on whole batches (N, C, H, W).

Hinton et al. (2018): downsample 96 -> 48, standardise each image, train on random 32x32 crops with
random brightness and contrast, test on the centre 32x32 crop (or average over 13 crops). Everything
here is vectorised over the batch; random choices come from a caller-supplied torch.Generator so a
run is reproducible from its seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Test-time crops as (row, col) shifts from the centre: the centre, then 1, 2 and 3 pixels up, down,
# left and right (13 crops; the authors' count, with the shifts along the axes).
MULTI_CROP_OFFSETS: tuple[tuple[int, int], ...] = ((0, 0),) + tuple(
    (sign * k * dr, sign * k * dc) for k in (1, 2, 3) for dr, dc in ((1, 0), (0, 1)) for sign in (-1, 1)
)


def _check_batch(x: torch.Tensor, name: str = "images") -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} must be a batch (N, C, H, W), got shape {tuple(x.shape)}")


def downsample(x: torch.Tensor, size: int = 48) -> torch.Tensor:
    """Area-average (N, C, H, W) -> float (N, C, size, size); uint8 input is scaled to [0, 1]."""
    _check_batch(x)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="area")


def standardise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each image (over C, H, W) to zero mean, unit variance: (N, C, H, W) -> same shape.

    As in tf.image.per_image_standardization, which the authors used: a blank image stays finite.
    """
    _check_batch(x)
    flat = x.reshape(x.shape[0], -1)
    mean = flat.mean(dim=1, keepdim=True)
    std = flat.std(dim=1, unbiased=False, keepdim=True).clamp_min(max(eps, 1.0 / flat.shape[1] ** 0.5))
    return ((flat - mean) / std).reshape(x.shape)


def preprocess(images: torch.Tensor, size: int = 48) -> torch.Tensor:
    """Raw smallNORB batch uint8 (N, C, 96, 96) -> standardised float (N, C, size, size)."""
    return standardise(downsample(images, size))


def crop_at(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> torch.Tensor:
    """Crop (N, C, H, W) at per-image corners top, left (N,) to (N, C, size, size), by one gather."""
    _check_batch(x)
    n, c, h, w = x.shape
    if size > h or size > w:
        raise ValueError(f"crop size {size} larger than images {h}x{w}")
    if (top < 0).any() or (left < 0).any() or (top > h - size).any() or (left > w - size).any():
        raise ValueError(f"crop corners out of range for {size}x{size} crops of {h}x{w} images")
    steps = torch.arange(size, device=x.device)
    rows = (top.to(x.device)[:, None] + steps)[:, :, None]
    cols = (left.to(x.device)[:, None] + steps)[:, None, :]
    flat_index = (rows * w + cols).reshape(n, 1, size * size).expand(n, c, size * size)
    return x.reshape(n, c, h * w).gather(2, flat_index).reshape(n, c, size, size)


def center_crop(x: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Centre crop (N, C, H, W) -> (N, C, size, size); odd margins put the extra pixel bottom-right."""
    _check_batch(x)
    top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
    return x[:, :, top:top + size, left:left + size]


def random_crop(x: torch.Tensor, size: int = 32, generator: torch.Generator | None = None) -> torch.Tensor:
    """An independent uniformly placed crop per image: (N, C, H, W) -> (N, C, size, size)."""
    _check_batch(x)
    n, _, h, w = x.shape
    top = torch.randint(0, h - size + 1, (n,), generator=generator)
    left = torch.randint(0, w - size + 1, (n,), generator=generator)
    return crop_at(x, top, left, size)


def random_brightness_contrast(x: torch.Tensor, max_brightness: float = 0.5,
                               contrast: tuple[float, float] = (0.5, 1.5),
                               generator: torch.Generator | None = None) -> torch.Tensor:
    """Per image: scale deviations from its mean by U(contrast), then add U(-max_brightness, max_brightness).

    Inputs are standardised, so the brightness shift is in units of the image's standard deviation.
    (N, C, H, W) -> same shape.
    """
    _check_batch(x)
    n = x.shape[0]
    low, high = contrast
    factor = (torch.rand(n, generator=generator) * (high - low) + low).to(x)
    shift = ((torch.rand(n, generator=generator) * 2 - 1) * max_brightness).to(x)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * factor.view(n, 1, 1, 1) + mean + shift.view(n, 1, 1, 1)


def train_augment(x: torch.Tensor, size: int = 32, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training view of preprocessed images (N, C, 48, 48) -> (N, C, size, size): random crop, brightness, contrast."""
    return random_brightness_contrast(random_crop(x, size, generator), generator=generator)


def multi_crop(x: torch.Tensor, size: int = 32,
               offsets: tuple[tuple[int, int], ...] = MULTI_CROP_OFFSETS) -> torch.Tensor:
    """Test-time crops (N, C, H, W) -> (N, K, C, size, size), K = len(offsets), centre first."""
    _check_batch(x)
    n, _, h, w = x.shape
    top0, left0 = (h - size) // 2, (w - size) // 2
    crops = []
    for dr, dc in offsets:
        top, left = top0 + dr, left0 + dc
        if not (0 <= top <= h - size and 0 <= left <= w - size):
            raise ValueError(f"offset {(dr, dc)} takes a {size}x{size} crop outside {h}x{w} images")
        crops.append(x[:, :, top:top + size, left:left + size])
    return torch.stack(crops, dim=1)
