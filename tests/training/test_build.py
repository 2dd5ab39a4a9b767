"""The learning-rate and margin schedules of a RunConfig."""

import pytest
import torch

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


def test_routing_path_names_what_a_run_will_route_with(monkeypatch):
    from emcaps import kernels
    from emcaps.training.build import build_model, routing_path

    cpu = torch.device("cpu")
    capsules = build_model(toy_config(), classes=5, in_channels=1)
    assert routing_path(build_model(toy_config("model.name=cnn"), classes=5, in_channels=1), cpu) is None
    assert routing_path(build_model(toy_config("runtime.backend=torch"), classes=5, in_channels=1), cpu) == \
        "routing with PyTorch ops (torch backend; chunks of 12 MB of votes, recomputed for the backward pass)"
    if kernels.library() is not None:
        threads = "OpenMP" if kernels.library().openmp else "a thread pool"
        assert routing_path(capsules, cpu) == f"routing on the native kernels ({threads})"
    from emcaps.routing import native
    for module in (kernels, native):                                # no compiler: the fallback says so
        monkeypatch.setattr(module, "library", lambda: None)
    assert routing_path(capsules, cpu).startswith("routing with PyTorch ops (auto backend; ")
