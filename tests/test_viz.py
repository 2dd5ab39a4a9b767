"""Routing histograms and parse maps on a tiny capsule net; the reconstruct experiment's figures, drawn
from given arrays."""

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
