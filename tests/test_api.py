"""The top-level API: `import emcaps` gives the models, the routing and the losses; the model registry."""

import pytest
import torch

import emcaps
from emcaps import config
from emcaps.models import _REGISTRY


def test_import_emcaps_gives_the_api():
    for name in ("create_model", "list_models", "register_model", "Capsules", "RoutingConfig", "Runtime",
                 "em_routing", "spread_loss", "PrimaryCaps", "ConvCaps", "ClassCaps", "MatrixCapsNet"):
        assert hasattr(emcaps, name), name
    assert emcaps.list_models() == ["paper", "small", "tiny", "cnn"]
    assert emcaps.list_models(capsules=True) == ["paper", "small", "tiny"]


def test_a_forward_pass_and_a_loss_from_the_top_level():
    torch.manual_seed(0)
    model = emcaps.create_model("tiny")
    scores = model(torch.randn(2, 1, 32, 32))
    loss = emcaps.spread_loss(scores, torch.tensor([0, 3]), margin=0.2)
    loss.backward()
    assert scores.shape == (2, 5) and torch.isfinite(loss)


def test_unknown_models_and_wrong_options_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'big'; expected one of paper, small, tiny, cnn"):
        emcaps.create_model("big")
    with pytest.raises(ValueError, match="the baseline CNN takes no capsule settings, got \\['routing'\\]"):
        emcaps.create_model("cnn", routing=emcaps.RoutingConfig())


def test_a_registered_model_is_known_to_run_configs():
    @emcaps.register_model("tiny2", description="a second tiny network")
    def tiny2(classes=5, in_channels=1, **options):
        return emcaps.create_model("tiny", classes=classes, in_channels=in_channels, **options)

    try:
        assert "tiny2" in emcaps.list_models()
        assert config.load(None, ["model.name=tiny2"]).model.name == "tiny2"
        with pytest.raises(ValueError, match="already registered"):
            emcaps.register_model("tiny2")(tiny2)
    finally:
        del _REGISTRY["tiny2"]
    with pytest.raises(config.ConfigError, match="model.name must be one of"):
        config.load(None, ["model.name=tiny2"])


def test_the_same_named_recipe_from_python_and_from_the_cli():
    """RoutingConfig.named(NAME) in create_model gives the model `--set routing.parameterisation=NAME` gives,
    initialisation included."""
    from emcaps.training.build import build_model

    for name in emcaps.PARAMETERISATIONS:
        torch.manual_seed(0)
        python = emcaps.create_model("tiny", routing=emcaps.RoutingConfig.named(name))
        torch.manual_seed(0)
        cli = build_model(config.load(None, ["model.name=tiny", f"routing.parameterisation={name}",
                                             "data.crop=32"]), classes=5, in_channels=1)
        assert python.config == cli.config, name
        for (k, a), (_, b) in zip(python.state_dict().items(), cli.state_dict().items()):
            assert torch.equal(a, b), (name, k)


def test_em_routing_defaults_are_the_routing_config_defaults():
    import inspect

    defaults = emcaps.RoutingConfig()
    params = inspect.signature(emcaps.em_routing).parameters
    shared = [p for p in params if hasattr(defaults, p)]
    assert {"iterations", "final_lambda", "var_floor", "estep_temperature", "detach_assignments"} <= set(shared)
    for name in shared:
        assert params[name].default == getattr(defaults, name), name
