"""Routing histograms, the pose decoder and its perturbation grid, and parse maps on a tiny capsule net."""

import struct

import numpy as np
import pytest
import torch

from emcaps import plots, viz
from emcaps.models import create_model
from emcaps.routing import RoutingConfig


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data.endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", data[16:24])                                # (width, height)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("tiny", classes=5, routing=RoutingConfig(iterations=3))


def test_routing_histograms(model, tmp_path):
    x = torch.randn(1, 32, 32)
    out = viz.routing_histograms(model, x, tmp_path / "hist.png", bins=10)
    assert out["counts"].shape == (3, 5, 10) and out["edges"].shape == (11,) and out["mass"].shape == (3, 5)
    # Every vote lands in a bin, so each panel's weights add up to the class's assignment mass.
    np.testing.assert_allclose(out["counts"].sum(-1), out["mass"], rtol=1e-9, atol=1e-9)
    assert (out["counts"] >= 0).all() and out["mass"].sum() > 0
    w, h = _png_size(tmp_path / "hist.png")
    assert w > 5 * 150 and h > 3 * 90
    assert model.training
    fig = viz.histograms_figure(out, ["a", "b", "c", "d", "e"])
    assert len(fig.axes) == 3 * 5
    assert [ax.get_title() for ax in fig.axes[:5]] == ["a", "b", "c", "d", "e"]
    assert fig.axes[5].get_ylabel() == "iteration 2\nassignment mass" and fig.axes[-1].get_xlabel() == "distance"


def test_histograms_need_a_capsule_net():
    with pytest.raises(ValueError, match="capsule network"):
        viz.routing_histograms(create_model("cnn"), torch.randn(1, 32, 32))


def test_decoder_and_perturbation_grid(model, tmp_path):
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(12, 1, 32, 32, generator=g), torch.arange(12) % 5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    decoder = viz.fit_decoder(viz.class_poses(model, images), images, labels, steps=30)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    recon = decoder(viz.class_poses(model, images), labels)
    assert recon.shape == images.shape
    pose = viz.class_poses(model, images[:1])[0]
    grid = viz.pose_perturbation_grid(decoder, pose, int(labels[0]), tmp_path / "grid.png", steps=5)
    assert grid.shape == (16, 5, 32, 32)
    # The middle column is the unperturbed pose; entries differ where they move.
    np.testing.assert_allclose(grid[:, 2], np.broadcast_to(grid[0, 2], (16, 32, 32)), atol=1e-5)
    assert not np.allclose(grid[:, 0], grid[:, 4])
    w, h = _png_size(tmp_path / "grid.png")
    assert w >= 5 * 64 and h >= 16 * 64
    (ax,) = viz.pose_grid_figure(grid).axes
    assert [t.get_text() for t in ax.get_yticklabels()][:2] == ["(0,0)", "(0,1)"] and ax.get_ylabel() == "pose entry"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["-1.0", "-0.5", "0", "+0.5", "+1.0"]


def test_fit_decoder_baseline_error_and_per_entry_ranges(model):
    g = torch.Generator().manual_seed(2)
    images, labels = torch.randn(12, 1, 32, 32, generator=g), torch.arange(12) % 5
    poses = viz.class_poses(model, images)                                  # (12, 5, 16)
    untrained, trained = (viz.fit_decoder(poses, images, labels, steps=s, seed=3) for s in (0, 40))
    # steps=0 is the trained decoder's starting point: a fair baseline for its reconstruction error.
    torch.manual_seed(3)
    fresh = viz.PoseDecoder(5, (1, 32, 32))
    assert all(torch.equal(a, b) for a, b in zip(untrained.net.parameters(), fresh.net.parameters()))
    # Both standardise each pose entry by the training poses of the target classes.
    own = poses[torch.arange(12), labels]                                   # (12, 16)
    for d in (untrained, trained):
        torch.testing.assert_close(d.pose_mean, own.mean(0))
        torch.testing.assert_close(d.pose_scale, own.std(0))
    errors = [viz.reconstruction_error(d, poses, images, labels) for d in (untrained, trained)]
    with torch.no_grad():
        direct = float(((trained(poses, labels) - images) ** 2).mean())
    assert errors[1] == pytest.approx(direct, rel=1e-6) and errors[1] < errors[0]
    # One range per entry: an entry given range 0 keeps its row constant.
    delta = torch.zeros(4, 4)
    delta[1, 1] = 0.5
    grid = viz.pose_perturbation_grid(trained, poses[0], int(labels[0]), steps=3, delta=delta)
    assert [not np.allclose(grid[k, 0], grid[k, 2]) for k in range(16)] == [k == 5 for k in range(16)]


def test_fit_decoder_keeps_its_best_state_on_held_out_images(model):
    g = torch.Generator().manual_seed(5)
    images, labels = torch.randn(40, 1, 32, 32, generator=g), torch.arange(40) % 5
    poses = viz.class_poses(model, images)                                  # (40, 5, 16)
    untrained = viz.fit_decoder(poses, images, labels, steps=0, seed=1, holdout=0.25)
    kept = viz.fit_decoder(poses, images, labels, steps=60, seed=1, holdout=0.25, check_every=20)
    assert untrained.best_step == 0 and kept.best_step in (0, 20, 40, 60)
    val = torch.randperm(40, generator=torch.Generator().manual_seed(2))[:10]   # the held-out images
    errors = [viz.reconstruction_error(d, poses[val], images[val], labels[val]) for d in (untrained, kept)]
    assert errors[1] <= errors[0]
    # Noise images: nothing carries over to held-out ones, so the state kept is an early one.
    assert kept.best_step < 60


def test_parse_map_conserves_credit(model, tmp_path):
    out = viz.parse_map(model, torch.randn(1, 1, 32, 32), tmp_path / "parse.png", scale=3)
    assert 0 <= out["winner"] < 5
    assert out["primary"].shape == (14, 14) and out["heat"].shape == (32, 32)
    assert (out["heat"] >= 0).all()
    np.testing.assert_allclose(out["primary"].sum(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out["heat"].sum(), 1.0, rtol=1e-5)
    w, h = _png_size(tmp_path / "parse.png")
    assert w > 96 and h > 96                                                # 32 pixels at scale 3, with axes
    ax = viz.parse_map_figure(np.zeros((32, 32)), out["heat"], out["winner"]).axes[0]
    assert ax.get_xlabel() == "x (pixels)" and len(ax.images) == 2          # the image and its heat overlay


def test_fit_decoder_holds_out_whole_groups():
    groups = torch.tensor([3, 3, 5, 5, 5, 7, 7, 9, 9, 9])
    val, fit = viz._holdout_split(10, 0.25, groups, seed=0)
    assert sorted(torch.cat([val, fit]).tolist()) == list(range(10))
    held = set(groups[val].tolist())
    assert len(held) == 1 and held.isdisjoint(groups[fit].tolist())       # round(0.25 * 4 groups) = 1
    assert len(viz._holdout_split(10, 0.9, groups, seed=0)[1]) > 0          # one group always trains
    with pytest.raises(ValueError, match="one entry per image"):
        viz._holdout_split(10, 0.25, groups[:9], seed=0)
    with pytest.raises(ValueError, match="two groups"):
        viz._holdout_split(10, 0.25, torch.zeros(10), seed=0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        viz._holdout_split(10, 1.0, None, seed=0)


def test_pose_decoder_bounds_far_out_poses():
    torch.manual_seed(0)
    labels = torch.tensor([1])
    far, farther = torch.full((1, 5, 16), 1e4), torch.full((1, 5, 16), 1e6)
    bounded, free = viz.PoseDecoder(5, bound=1.5), viz.PoseDecoder(5, bound=0)
    free.load_state_dict(bounded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(bounded(far, labels), bounded(farther, labels))   # saturated at +-1.5
        assert bounded(farther, labels).abs().max() < 1e3 < free(farther, labels).abs().max()
        small = torch.full((1, 5, 16), 1e-3)
        torch.testing.assert_close(bounded(small, labels), free(small, labels), atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="bound"):
        viz.PoseDecoder(5, bound=-1.0)


def test_reconstructions_figure_titles_misclassified_digits():
    rng = np.random.default_rng(0)
    inputs, redrawn = rng.normal(size=(3, 32, 32)), rng.normal(size=(3, 32, 32))
    fig = viz.reconstructions_figure(inputs, redrawn, [0, 1, 2], [0, 7, 2])
    assert len(fig.axes) == 2 * 3 and all(len(ax.images) == 1 for ax in fig.axes)
    assert [ax.get_title() for ax in fig.axes[:3]] == ["0", "1->7", "2"]
    assert fig.axes[0].get_ylabel() == "input" and fig.axes[3].get_ylabel() == "redrawn"
    # Reconstructions share the inputs' value range, so a faint one looks faint.
    assert fig.axes[4].images[0].get_clim() == (inputs.min(), inputs.max())


def test_pose_perturbation_figure_has_a_panel_per_digit(tmp_path):
    rng = np.random.default_rng(1)
    digits, steps = 2, 5
    originals, grids = rng.normal(size=(digits, 32, 32)), rng.normal(size=(digits, 16, steps, 32, 32))
    fig = viz.pose_perturbation_figure(originals, grids, np.linspace(-2, 2, steps), [3, 8])
    shown = [ax for ax in fig.axes if ax.axison]
    assert len(fig.axes) == 17 * (digits * (steps + 1) - 1)          # a blank column between panels
    assert len(shown) == digits * (1 + 16 * steps) and all(len(ax.images) == 1 for ax in shown)
    assert [ax.get_title() for ax in shown if ax.get_title()] == ["digit 3", "digit 8"]
    assert [ax.get_ylabel() for ax in shown if ax.get_ylabel()][:2] == ["(0,0)", "(0,1)"]
    assert [ax.get_xlabel() for ax in shown if ax.get_xlabel()][:3] == ["-2.0 sd", "0", "+2.0 sd"]
    w, h = _png_size(plots.save(fig, tmp_path / "grid.png"))
    assert w > digits * steps * 32 and h > 17 * 32
