"""The weight average (train.ema_decay): its arithmetic, and how a run tests, saves and resumes it."""

import pytest
import torch
from torch import nn

from emcaps import config
from emcaps.training import checkpoint, loop
from emcaps.training.averaging import WeightAverage

from .test_loop import assert_same_weights, toy_config, weights


def test_update_is_the_exponential_moving_average_with_warm_up():
    model = nn.Linear(3, 2)
    model.register_buffer("count", torch.tensor(0))
    average = WeightAverage(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
        model.count.add_(5)
    average.update(model, step=1)                       # warm-up decay: min(0.9, 2 / 11)
    d = 2 / 11
    torch.testing.assert_close(average.average.weight, d * start + (1 - d) * model.weight)
    assert average.average.count.item() == 5            # integer buffers are copied, not averaged
    assert average.decay_at(1000) == 0.9
    assert not average.average.weight.requires_grad and not average.average.training
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(model, decay=1.0)


def test_ema_decay_is_checked():
    with pytest.raises(config.ConfigError, match="ema_decay"):
        toy_config("train.ema_decay=1.5")


def test_a_run_with_averaging_trains_the_same_weights_and_exports_the_average(tmp_path):
    plain = loop.train(toy_config(), tmp_path / "plain", quiet=True)
    averaged = loop.train(toy_config("train.ema_decay=0.5"), tmp_path / "averaged", quiet=True)
    assert_same_weights(weights(tmp_path / "plain"), weights(tmp_path / "averaged"))   # training is untouched
    state = checkpoint.load_checkpoint(tmp_path / "averaged")
    assert "ema_model" in state and "ema_model" not in checkpoint.load_checkpoint(tmp_path / "plain")
    differs = [k for k in state["model"] if not torch.equal(state["model"][k], state["ema_model"][k])]
    assert differs
    model, _, _ = checkpoint.model_from_checkpoint(tmp_path / "averaged")
    assert_same_weights(model.state_dict(), state["ema_model"])                     # eval and export the average
    assert plain["steps"] == averaged["steps"] == 8


def test_resume_with_averaging_is_exact(tmp_path):
    cfg = toy_config("train.ema_decay=0.8")
    straight = loop.train(cfg, tmp_path / "straight", quiet=True)
    loop.train(cfg, tmp_path / "split", quiet=True, stop_at_step=5)
    resumed = loop.resume(tmp_path / "split", quiet=True)
    assert_same_weights(checkpoint.load_checkpoint(tmp_path / "straight")["ema_model"],
                        checkpoint.load_checkpoint(tmp_path / "split")["ema_model"])
    assert resumed["test_error"] == straight["test_error"]


def test_callbacks_see_the_average(tmp_path):
    seen = []
    loop.train(toy_config("train.ema_decay=0.5"), tmp_path / "run", quiet=True,
               callback=lambda step, model: seen.append(model.training))
    assert seen and not any(seen)                       # the average, kept in eval mode, not the training model
