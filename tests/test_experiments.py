"""The experiment commands end to end in fast mode, on a small smallNORB-format data set written here
(class-dependent blobs at the tiny SynthNORB subset's viewpoints), so no rendering or download is needed."""

import json
import struct

import numpy as np
import pytest

from emcaps import cli
from emcaps.data.norb_format import write_norb
from emcaps.data.smallnorb import SPLIT_FILES, TEST_INSTANCES, TRAIN_INSTANCES

ELEVATIONS = (0, 4, 8)
AZIMUTHS = (0, 3, 9, 15, 17)        # x 20 degrees: 0, 60, 180, 300, 340


@pytest.fixture(scope="module")
def norb(tmp_path_factory):
    root = tmp_path_factory.mktemp("norb")
    rng = np.random.default_rng(0)
    for split, instances in (("train", TRAIN_INSTANCES[:2]), ("test", TEST_INSTANCES[:2])):
        grid = np.meshgrid(np.arange(5), instances, ELEVATIONS, AZIMUTHS, indexing="ij")
        cat, inst, elev, azim = (g.reshape(-1) for g in grid)
        images = rng.integers(0, 60, (len(cat), 2, 32, 32)).astype(np.uint8)
        for i, (c, a) in enumerate(zip(cat, azim)):
            top, left = 4 + 5 * c, 6 + (a % 4)
            images[i, :, top:top + 6, left:left + 12] = 230
        info = np.stack([inst, elev, 2 * azim, np.zeros_like(cat)], 1).astype(np.int32)
        names = SPLIT_FILES[split]
        write_norb(root / names["dat"], images)
        write_norb(root / names["cat"], cat.astype(np.int32))
        write_norb(root / names["info"], info)
    return root


def _png_ok(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    assert w > 50 and h > 50


def _run(args, capsys):
    status = cli.main(args)
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return captured


@pytest.mark.parametrize("split", ["azimuth", "elevation"])
def test_viewpoint_fast(norb, tmp_path, capsys, split):
    out = tmp_path / split
    _run(["experiment", "viewpoint", "--split", split, "--fast", "--quiet", "--data", "smallnorb",
          "--root", str(norb), "--out", str(out)], capsys)
    results = json.loads((out / "results.json").read_text())
    assert results["split"] == split and set(results["models"]) == {"cnn", "capsules"}
    for m in results["models"].values():
        assert 0 <= m["familiar_error"] <= 1 and 0 <= m["novel_error"] <= 1 and m["params"] > 0
        assert 1 <= m["steps"] <= 8
    values = results["per_view"]["values"]
    assert len(values) == (5 if split == "azimuth" else 3)
    assert all(0 <= e <= 1 for e in results["per_view"]["capsules"])
    md = (out / "results.md").read_text()
    assert "familiar error" in md and "| CNN" in md and "| capsules" in md
    for name in results["figures"]:
        _png_ok(out / name)
    assert "![parse map](parse-map.png)" in md


def test_adversarial_fast(norb, tmp_path, capsys):
    out = tmp_path / "adv"
    _run(["experiment", "adversarial", "--fast", "--quiet", "--data", "smallnorb", "--root", str(norb),
          "--out", str(out)], capsys)
    results = json.loads((out / "results.json").read_text())
    assert set(results["curves"]) == {"fgsm", "bim"} and results["eps"] == [0.0, 0.5]
    for method in results["curves"].values():
        for kind in ("untargeted_accuracy", "targeted_success"):
            assert set(method[kind]) == {"cnn", "capsules"}
            assert all(0 <= v <= 1 and len(vals) == 2 for vals in method[kind].values() for v in vals)
    # eps 0 leaves the images alone: FGSM and BIM agree on the clean accuracy.
    for name in ("cnn", "capsules"):
        assert results["curves"]["fgsm"]["untargeted_accuracy"][name][0] == \
            results["curves"]["bim"]["untargeted_accuracy"][name][0]
    for name in results["figures"]:
        _png_ok(out / name)
    assert "FGSM: untargeted accuracy" in (out / "results.md").read_text()


def test_adversarial_needs_both_checkpoints(capsys):
    assert cli.main(["experiment", "adversarial", "--capsnet", "x.pt"]) == 1
    assert "give both --capsnet" in capsys.readouterr().err


def test_ablation_fast(norb, tmp_path, capsys):
    out = tmp_path / "abl"
    _run(["experiment", "ablation", "--fast", "--quiet", "--only", "coord,loss", "--data", "smallnorb",
          "--root", str(norb), "--out", str(out)], capsys)
    results = json.loads((out / "results.json").read_text())
    assert set(results["groups"]) == {"coord", "loss"}
    assert len(results["runs"]) == 4                    # the base is shared by both groups
    for run in results["runs"].values():
        assert 0 <= run["test_error"] <= 1 and run["steps"] == 4
    md = (out / "results.md").read_text()
    groups = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")][1:]
    assert groups == ["coord"] * 2 + ["loss"] * 3 and "cross-entropy" in md


def test_ablation_rejects_unknown_groups(capsys):
    assert cli.main(["experiment", "ablation", "--only", "iterations,pose"]) == 1
    assert "unknown ablation group(s) pose" in capsys.readouterr().err


def test_report_gathers_tables_and_figures(tmp_path, capsys):
    from emcaps.data.png import write_png

    a, b = tmp_path / "runs" / "viewpoint", tmp_path / "runs" / "demo"
    write_png(a / "error.png", np.zeros((60, 60), np.uint8))
    (a / "results.md").write_text("# Novel viewpoints\n\n| model | error |\n|---|---|\n| CNN | 5.0% |\n\n"
                                  "![error](error.png)\n")
    write_png(b / "eval" / "confusion.png", np.zeros((60, 60), np.uint8))
    out = tmp_path / "site" / "report.md"
    _run(["report", str(a), str(b), "--out", str(out)], capsys)
    md = out.read_text()
    assert "## viewpoint" in md and "### Novel viewpoints" in md and "| CNN | 5.0% |" in md
    assert "](../runs/viewpoint/error.png)" in md and "](../runs/demo/eval/confusion.png)" in md
    page = out.with_suffix(".html").read_text()
    assert "<table>" in page and "<th>model</th>" in page
    assert '<img alt="error" src="../runs/viewpoint/error.png">' in page


def test_report_errors(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "missing")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path)]) == 1
    assert "holds no results.md" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["experiment", "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in ("viewpoint", "adversarial", "ablation"))
