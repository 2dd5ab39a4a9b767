"""The learning-rate and margin schedules of a RunConfig."""

import pytest

from emcaps import config
from emcaps.training.build import lr_factor, margin_at


def toy_config(*overrides: str) -> config.RunConfig:
    return config.load(None, ["data.dataset=toy", "model.name=tiny", *overrides])


def test_schedules():
    cfg = toy_config("optim.lr_schedule=cosine", "optim.min_lr_ratio=0.1").optim
    f = lr_factor(cfg, 100)
    assert f(0) == pytest.approx(1.0) and f(100) == pytest.approx(0.1) and f(50) == pytest.approx(0.55)
    cfg = toy_config("optim.lr_schedule=exponential", "optim.lr_decay=0.5", "optim.decay_steps=10").optim
    assert lr_factor(cfg, 100)(20) == pytest.approx(0.25)
    loss = toy_config().loss
    assert margin_at(loss, 0, 11) == pytest.approx(0.2) and margin_at(loss, 10, 11) == pytest.approx(0.9)
