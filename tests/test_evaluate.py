"""Evaluation: confusion matrices, per-viewpoint error, multi-crop averaging, and `evaluate_run` outputs."""

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from torch import nn

from emcaps import config, evaluate
from emcaps.data.transforms import MULTI_CROP_OFFSETS
from emcaps.training import checkpoint, loop


def test_confusion_rows_are_true_classes():
    m = evaluate.confusion([0, 1, 1, 2], [0, 0, 1, 2], 3)
    assert m.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert evaluate.error_rate([0, 1, 1, 2], [0, 0, 1, 2]) == 0.25


def test_per_viewpoint_error_grid():
    pred = np.array([0, 1, 0, 0, 1])
    labels = np.array([0, 0, 0, 0, 1])
    az = np.array([0, 0, 20, 20, 0])
    el = np.array([0, 0, 0, 3, 3])
    pv = evaluate.per_viewpoint_error(pred, labels, az, el)
    assert pv["azimuths"] == [0, 20] and pv["elevations"] == [0, 3]
    assert pv["error"] == [[0.5, 0.0], [0.0, 0.0]]
    assert pv["count"] == [[2, 1], [1, 1]]
    pv = evaluate.per_viewpoint_error(pred[:3], labels[:3], az[:3], np.array([0, 0, 1]))
    assert pv["error"][1] == [None, 0.0]            # no image at (elevation 1, azimuth 0)


class Corner(nn.Module):
    """Scores from the top-left pixel of each crop: (N, 1, S, S) -> (N, 2) activations."""

    score_kind = "activation"

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        v = x[:, 0, 0, 0]
        return torch.stack((v, -v), 1) + self.dummy


def test_predict_and_multi_crop_average_over_the_13_crops():
    images = torch.arange(2 * 10 * 10, dtype=torch.float32).view(2, 1, 10, 10)
    labels = torch.tensor([0, 1])
    scores, y = evaluate.predict(Corner(), [(images[:, :, 2:6, 2:6], labels)])
    assert torch.equal(scores[:, 0], images[:, 0, 2, 2]) and torch.equal(y, labels)
    scores, _ = evaluate.multi_crop_predict(Corner(), images, labels, crop=4, batch_size=5)
    assert len(MULTI_CROP_OFFSETS) == 13
    # The crop corners are symmetric about the centre corner (3, 3), so their mean is the centre pixel.
    assert torch.allclose(scores[:, 0], images[:, 0, 3, 3])


def test_logits_are_averaged_as_probabilities():
    logits = torch.tensor([[0.0, 10.0]])
    assert torch.allclose(evaluate.to_probabilities(logits, "logit").sum(1), torch.ones(1))
    assert torch.equal(evaluate.to_probabilities(logits, "activation"), logits)


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and zlib.crc32(data[12:16 + length]) == struct.unpack(">I", data[16 + length:20 + length])[0]
    return struct.unpack(">II", data[16:24])


def test_evaluate_run_writes_json_and_png(tmp_path):
    cfg = config.load(None, ["name=toy", "data.dataset=toy", "data.resize=38", "data.train_limit=32",
                             "data.test_limit=40", "model.name=tiny", "train.epochs=1", "train.batch_size=16",
                             "train.threads=1"])
    loop.train(cfg, tmp_path / "run", quiet=True)
    result = evaluate.evaluate_run(tmp_path / "run", quiet=True)
    saved = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert saved["test_error"] == result["test_error"] and saved["images"] == 40
    assert np.array(saved["confusion"]).sum() == 40 and "per_viewpoint" not in saved   # toy data has no views
    assert _png_size(tmp_path / "run" / "eval" / "confusion.png")[0] > 100
    multi = evaluate.evaluate_run(tmp_path / "run" / "checkpoint.pt", multi_crop=True, out_dir=tmp_path / "mc",
                                  quiet=True)
    assert multi["crops"] == 13 and (tmp_path / "mc" / "results-multicrop.json").is_file()
    with pytest.raises(config.ConfigError, match="only change data"):
        evaluate.evaluate_run(tmp_path / "run", overrides=["train.epochs=3"], quiet=True)


def test_a_run_routed_for_a_gpu_evaluates_on_a_cpu(tmp_path):
    """A saved run's runtime says how it routed; a backend of another device gives way to 'auto' on this one,
    and eval's runtime.* overrides choose one explicitly."""
    cfg = config.load(None, ["name=toy", "data.dataset=toy", "data.resize=38", "data.train_limit=32",
                             "data.test_limit=40", "model.name=tiny", "train.epochs=1", "train.batch_size=16",
                             "train.threads=1"])
    loop.train(cfg, tmp_path / "run", quiet=True)
    on_cpu = evaluate.evaluate_run(tmp_path / "run", device="cpu", quiet=True)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    state["config"]["runtime"]["backend"] = "triton"               # as a run on a GPU saves it
    torch.save(state, tmp_path / "gpu.pt")
    model, saved, _ = checkpoint.model_from_checkpoint(tmp_path / "gpu.pt", "cpu")
    assert saved.runtime.backend == "auto" and model.class_caps.runtime.backend == "auto"
    assert evaluate.evaluate_run(tmp_path / "gpu.pt", device="cpu", quiet=True)["test_error"] == on_cpu["test_error"]
    torch_ops = evaluate.evaluate_run(tmp_path / "gpu.pt", device="cpu", overrides=["runtime.backend=torch"],
                                      quiet=True, out_dir=tmp_path / "torch")
    assert torch_ops["test_error"] == on_cpu["test_error"]
