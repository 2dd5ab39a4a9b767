import pytest
import torch

from emcaps.data.transforms import (
    MULTI_CROP_OFFSETS,
    center_crop,
    crop_at,
    downsample,
    multi_crop,
    preprocess,
    random_brightness_contrast,
    random_crop,
    standardise,
    train_augment,
)


def ramp(n=2, c=2, size=48):
    """(n, c, size, size) images whose pixel (i, j) holds 1000 * image + 100 * i + j."""
    i = torch.arange(size).view(1, 1, size, 1)
    j = torch.arange(size).view(1, 1, 1, size)
    k = torch.arange(n).view(n, 1, 1, 1)
    return (1000 * k + 100 * i + j + torch.zeros(n, c, 1, 1)).float()


def test_downsample_area_average():
    x = torch.zeros(3, 2, 96, 96, dtype=torch.uint8)
    x[:, :, 0, 0] = 255
    out = downsample(x)
    assert out.shape == (3, 2, 48, 48) and out.dtype == torch.float32
    assert out[0, 0, 0, 0].item() == pytest.approx(0.25)
    assert out[0, 0, 0, 1].item() == 0


def test_standardise_statistics_and_blank_images():
    x = torch.rand(5, 2, 48, 48) * 7 + 3
    x[4] = 0.5
    out = standardise(x)
    flat = out[:4].reshape(4, -1)
    assert torch.allclose(flat.mean(1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(flat.std(1, unbiased=False), torch.ones(4), atol=1e-4)
    assert torch.isfinite(out).all() and (out[4] == 0).all()


def test_preprocess_shapes():
    out = preprocess(torch.randint(0, 256, (4, 2, 96, 96), dtype=torch.uint8))
    assert out.shape == (4, 2, 48, 48)


def test_center_crop_of_ramp():
    crop = center_crop(ramp(), 32)
    assert crop.shape == (2, 2, 32, 32)
    assert crop[0, 0, 0, 0].item() == 8 * 100 + 8
    assert crop[1, 1, 31, 31].item() == 1000 + 39 * 100 + 39


def test_crop_at_matches_slicing():
    x = ramp(3)
    top, left = torch.tensor([0, 5, 16]), torch.tensor([16, 2, 0])
    out = crop_at(x, top, left, 32)
    for n in range(3):
        assert torch.equal(out[n], x[n, :, top[n]:top[n] + 32, left[n]:left[n] + 32])
    with pytest.raises(ValueError, match="out of range"):
        crop_at(x, torch.tensor([17, 0, 0]), left, 32)


def test_random_crop_positions_are_valid_varied_and_seeded():
    x = ramp(64, 1)
    out = random_crop(x, 32, torch.Generator().manual_seed(1))
    corner = out[:, 0, 0, 0] - 1000 * torch.arange(64)
    top, left = corner // 100, corner % 100
    assert ((0 <= top) & (top <= 16) & (0 <= left) & (left <= 16)).all()
    assert len(set(zip(top.tolist(), left.tolist()))) > 20
    assert torch.equal(out[:, 0, 1:, 1:] - out[:, 0, :-1, :-1], torch.full((64, 31, 31), 101.0))
    again = random_crop(x, 32, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_multi_crop_offsets_and_positions():
    assert len(MULTI_CROP_OFFSETS) == 13 and len(set(MULTI_CROP_OFFSETS)) == 13
    assert MULTI_CROP_OFFSETS[0] == (0, 0)
    assert {max(abs(r), abs(c)) for r, c in MULTI_CROP_OFFSETS[1:]} == {1, 2, 3}
    crops = multi_crop(ramp(), 32)
    assert crops.shape == (2, 13, 2, 32, 32)
    for k, (dr, dc) in enumerate(MULTI_CROP_OFFSETS):
        assert crops[0, k, 0, 0, 0].item() == (8 + dr) * 100 + (8 + dc)
    assert torch.equal(crops[:, 0], center_crop(ramp(), 32))


def test_brightness_contrast_identity_and_range():
    x = standardise(torch.rand(8, 2, 32, 32))
    same = random_brightness_contrast(x, max_brightness=0.0, contrast=(1.0, 1.0))
    assert torch.allclose(same, x, atol=1e-6)
    out = random_brightness_contrast(x, generator=torch.Generator().manual_seed(0))
    mean_shift = (out.mean((1, 2, 3)) - x.mean((1, 2, 3))).abs()
    ratio = out.std((1, 2, 3)) / x.std((1, 2, 3))
    assert (mean_shift <= 0.5 + 1e-5).all() and ((ratio >= 0.5 - 1e-4) & (ratio <= 1.5 + 1e-4)).all()
    assert ratio.std() > 0.01


def test_train_augment_shape_and_bad_input():
    out = train_augment(torch.randn(4, 2, 48, 48), generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 2, 32, 32)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        standardise(torch.randn(48, 48))
