import json

import matplotlib.image
import numpy as np
import pytest
import torch

from emcaps.data.norb_format import read_norb
from emcaps.data.smallnorb import SPLIT_FILES, TEST_INSTANCES, TRAIN_INSTANCES, SmallNORB
from emcaps.data.synthnorb import SUBSETS, Subset, ensure_synthnorb, render_dataset, show

SIZE = 32
TINY = SUBSETS["tiny"]
PAIRS = 5 * 5 * len(TINY.azimuths) * len(TINY.elevations) * len(TINY.lightings)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return render_dataset(tmp_path_factory.mktemp("synth"), size=SIZE, seed=0, subset="tiny", progress=False)


def test_files_and_manifest(tiny_dir):
    for split in ("train", "test"):
        for name in SPLIT_FILES[split].values():
            assert (tiny_dir / name).is_file()
    manifest = json.loads((tiny_dir / "synthnorb.json").read_text())
    assert manifest["subset"] == "tiny" and manifest["size"] == SIZE and manifest["seed"] == 0
    assert manifest["azimuths"] == list(TINY.azimuths)


@pytest.mark.parametrize("split, instances", [("train", TRAIN_INSTANCES), ("test", TEST_INSTANCES)])
def test_smallnorb_reads_it_with_fields_in_range(tiny_dir, split, instances):
    data = SmallNORB(tiny_dir, split)
    assert len(data) == PAIRS
    image, label = data[0]
    assert image.shape == (2, SIZE, SIZE) and image.dtype == torch.uint8 and 0 <= label < 5
    assert set(data.labels) == set(range(5))
    assert set(data.instance) == set(instances)
    assert set(data.elevation) == set(TINY.elevations)
    assert set(data.azimuth) == {20 * a for a in TINY.azimuths}
    assert set(data.lighting) == set(TINY.lightings)
    info = read_norb(tiny_dir / SPLIT_FILES[split]["info"])
    assert info.shape == (PAIRS, 4) and set(info[:, 2]) == {2 * a for a in TINY.azimuths}
    assert np.bincount(data.labels).tolist() == [PAIRS // 5] * 5


def test_splits_disjoint_by_instance(tiny_dir):
    assert not set(SmallNORB(tiny_dir, "train").instance) & set(SmallNORB(tiny_dir, "test").instance)


def _pick(data, **fields):
    keep = np.ones(len(data), bool)
    for name, value in fields.items():
        keep &= getattr(data, name) == value
    (index,) = np.flatnonzero(keep)
    return data[index][0].float()


def test_images_not_blank_and_vary_with_viewpoint_and_light(tiny_dir):
    data = SmallNORB(tiny_dir, "test")
    images = torch.from_numpy(data.images()).float()
    assert (images.reshape(len(data), -1).std(1) > 5).all()
    base = dict(labels=2, instance=0, elevation=0, azimuth=0, lighting=0)
    reference = _pick(data, **base)
    for change in (dict(azimuth=180), dict(elevation=8), dict(lighting=3)):
        other = _pick(data, **{**base, **change})
        assert (other - reference).abs().mean() > 3, change
    left, right = reference
    assert 0 < (left - right).abs().mean() < (reference - _pick(data, **{**base, "azimuth": 180})).abs().mean()


def test_lighting_changes_shading_not_geometry(tiny_dir):
    data = SmallNORB(tiny_dir, "train")
    dim = _pick(data, labels=3, instance=4, elevation=4, azimuth=0, lighting=0)
    other = _pick(data, labels=3, instance=4, elevation=4, azimuth=0, lighting=3)
    assert dim.shape == other.shape and not torch.equal(dim, other)


def test_viewpoint_filters(tiny_dir):
    per_azimuth = PAIRS // len(TINY.azimuths)
    per_elevation = PAIRS // len(TINY.elevations)
    familiar_az = SmallNORB(tiny_dir, "train", azimuths="familiar")
    novel_az = SmallNORB(tiny_dir, "train", azimuths="novel")
    assert len(familiar_az) == 3 * per_azimuth and set(familiar_az.azimuth) == {0, 300, 340}
    assert len(novel_az) == 2 * per_azimuth and set(novel_az.azimuth) == {60, 180}
    familiar_el = SmallNORB(tiny_dir, "test", elevations="familiar")
    novel_el = SmallNORB(tiny_dir, "test", elevations="novel")
    assert len(familiar_el) == per_elevation and set(familiar_el.elevation) == {0}
    assert len(novel_el) == 2 * per_elevation and set(novel_el.elevation_degrees) == {50, 70}
    left = SmallNORB(tiny_dir, "test", cameras="left", lightings=[3])
    assert left[0][0].shape == (1, SIZE, SIZE) and len(left) == PAIRS // 2
    with pytest.raises(ValueError, match="familiar"):
        SmallNORB(tiny_dir, "test", azimuths="sideways")


def test_deterministic_for_a_seed(tiny_dir, tmp_path):
    subset = Subset("one", azimuths=(0, 9), elevations=(4,), lightings=(3,))
    first = render_dataset(tmp_path / "a", size=SIZE, seed=0, subset=subset, progress=False)
    again = render_dataset(tmp_path / "b", size=SIZE, seed=0, subset=subset, progress=False)
    other = render_dataset(tmp_path / "c", size=SIZE, seed=1, subset=subset, progress=False)
    name = SPLIT_FILES["train"]["dat"]
    assert (first / name).read_bytes() == (again / name).read_bytes()
    assert (first / name).read_bytes() != (other / name).read_bytes()
    full = SmallNORB(tiny_dir, "train", azimuths=[0, 180], elevations=[4], lightings=[3])
    assert np.array_equal(SmallNORB(first, "train").images(), full.images())


def test_ensure_synthnorb_renders_once_atomically(tmp_path):
    subset = Subset("dot", azimuths=(0,), elevations=(0,), lightings=(0,))
    path = ensure_synthnorb(size=16, seed=3, subset=subset, data_dir=tmp_path, progress=False)
    stamp = (path / "synthnorb.json").stat().st_mtime_ns
    assert ensure_synthnorb(size=16, seed=3, subset=subset, data_dir=tmp_path, progress=False) == path
    assert (path / "synthnorb.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert len(SmallNORB(path, "test")) == 25


def test_bad_subsets_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown SynthNORB subset"):
        render_dataset(tmp_path, subset="huge", progress=False)
    with pytest.raises(ValueError, match="azimuths must be distinct indices in 0..17"):
        Subset("odd", azimuths=(0, 18))
    with pytest.raises(ValueError, match="lightings"):
        Subset("none", lightings=())


def test_show_writes_png(tiny_dir, tmp_path):
    out = show(tiny_dir, tmp_path / "m.png")
    raw = out.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
    scale = max(1, 96 // SIZE)                                  # screen pixels per image pixel
    assert width > len(TINY.azimuths) * SIZE * scale and height > 5 * SIZE * scale
    assert matplotlib.image.imread(out).shape[:2] == (height, width)           # decodes as a whole image


def test_stereo_rig_left_then_right():
    from emcaps.data.synthnorb import Camera, camera_positions, camera_rays

    target = torch.tensor([0.0, 0.0, 0.5])
    eyes = camera_positions(torch.tensor([0.0, 100.0, 260.0]), 45.0, target, Camera())
    assert torch.allclose((eyes - target).norm(dim=-1), torch.full((3, 2), (3.6**2 + 0.175**2) ** 0.5))
    for rig in eyes:
        rays = camera_rays(rig, target.expand(2, 3), 3, 17.0)
        camera_right = rays[0, 5] - rays[0, 4]
        assert ((rig[1] - rig[0]) * camera_right).sum() > 0
