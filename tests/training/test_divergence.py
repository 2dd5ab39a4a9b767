"""Where non-finite values start: a parameter, the input, or a layer's output."""

import torch

from emcaps import config
from emcaps.training.build import build_model
from emcaps.training.divergence import diagnose


def toy_config() -> config.RunConfig:
    return config.load(None, ["data.dataset=toy", "model.name=tiny"])


def test_diagnosis_names_the_first_layer_with_non_finite_output():
    model = build_model(toy_config(), 5, 1)
    with torch.no_grad():
        model.conv1.bias.fill_(float("inf"))
    assert diagnose(model, torch.zeros(2, 1, 32, 32)) == "first non-finite parameter: conv1.bias"
    model = build_model(toy_config(), 5, 1)
    assert "input batch" in diagnose(model, torch.full((2, 1, 32, 32), float("nan")))
    with torch.no_grad():
        model.conv1.weight.fill_(1e30)                # finite weights whose product with the input overflows
    assert diagnose(model, torch.full((2, 1, 32, 32), 1e30)).endswith("non-finite output: conv1")
