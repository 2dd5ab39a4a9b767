"""matplotlib figures: what each shows (axes, labels, legend, cell values) and that the PNGs are real."""

import struct
import zlib

import numpy as np

from emcaps import plots


def png_size(path):
    """(width, height) of a PNG, after checking its signature and the IHDR chunk's CRC."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and zlib.crc32(data[12:16 + length]) == struct.unpack(">I", data[16 + length:20 + length])[0]
    return struct.unpack(">II", data[16:24])


def test_line_figure_axes_legend_and_gaps(tmp_path):
    series = {"capsules": ([1, 2, 3], [30.0, float("nan"), 20.0]), "cnn": ([1, 2, 3], [25.0, 15.0, 10.0])}
    fig = plots.line_figure(series, title="test error", xlabel="epoch", ylabel="test error (%)", ylim=(0, 100))
    (ax,) = fig.axes
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("test error", "epoch", "test error (%)")
    assert ax.get_ylim() == (0, 100)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["capsules", "cnn"]
    assert np.isnan(ax.lines[0].get_ydata()[1])                             # a gap, not a made-up point
    path = plots.line_plot(tmp_path / "l.png", series, xlabel="epoch")
    assert png_size(path) == (640, 420)
    assert plots.line_figure({"one": ([0], [1.0])}).axes[0].get_legend() is None


def test_heatmap_figure_writes_each_cell_and_labels_the_colour_bar(tmp_path):
    m = np.array([[5.0, 1.0], [np.nan, 7.0]])
    fig = plots.heatmap_figure(m, ["cat", "dog"], ["cat", "dog"], title="confusion", xlabel="predicted class",
                               ylabel="true class", unit="test images")
    ax, bar = fig.axes
    assert sorted(t.get_text() for t in ax.texts) == ["1", "5", "7"]        # the NaN cell stays empty
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cat", "dog"]
    assert (ax.get_xlabel(), ax.get_ylabel(), bar.get_ylabel()) == ("predicted class", "true class", "test images")
    w, h = png_size(plots.heatmap(tmp_path / "h.png", m, ["cat", "dog"], ["cat", "dog"]))
    assert w > 100 and h > 100


def test_montage_layout():
    tiles = np.arange(3 * 2 * 2, dtype=float).reshape(3, 2, 2)
    out = plots.montage(tiles, columns=2, gap=1)
    assert out.shape == (2 * 3 + 1, 2 * 3 + 1)
    np.testing.assert_array_equal(out[1:3, 4:6], tiles[1])
    assert np.isnan(out[0]).all() and np.isnan(out[4:6, 4:6]).all()        # gaps and the empty slot


def test_image_grid_labels_and_size(tmp_path):
    images = np.random.default_rng(0).random((6, 8, 8))
    fig = plots.image_grid_figure(images, columns=3, scale=4, labels=["animal", "human"],
                                  col_labels=["0", "20", "40"], xlabel="azimuth (degrees)")
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["animal", "human"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "20", "40"]
    assert ax.get_xlabel() == "azimuth (degrees)"
    w, h = png_size(plots.image_grid(tmp_path / "g.png", images, columns=3, scale=4))
    assert w >= (3 * 10 + 2) * 4 and h >= (2 * 10 + 2) * 4                  # every image pixel is 4x4 pixels
    fixed = plots.image_grid_figure(np.full((1, 4, 4), 255.0), columns=1, value_range=(0, 255))
    assert fixed.axes[0].images[0].get_array().max() == 1.0                  # not stretched to its own range
