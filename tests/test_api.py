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
    with pytest.raises(TypeError, match="model 'cnn' takes classes, in_channels, image_size, dropout; got an "
                                        "unexpected keyword argument 'routing'"):
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


def test_a_builder_takes_the_keywords_register_model_documents():
    """create_model passes what its caller gives; a run config passes image_size and, to a capsule network,
    routing, runtime and the model.* options. A builder that cannot take them is named, with what it takes."""
    from emcaps.training.build import build_model

    calls = []

    @emcaps.register_model("mine")
    def mine(classes, in_channels, *, image_size=32, routing=None, runtime=None, **options):
        calls.append((classes, in_channels, image_size, routing, runtime, options))
        return emcaps.create_model("tiny", classes=classes, in_channels=in_channels, routing=routing,
                                   runtime=runtime, image_size=image_size, **options)

    @emcaps.register_model("narrow")
    def narrow(classes, in_channels):
        return emcaps.create_model("tiny", classes=classes, in_channels=in_channels)

    try:
        assert emcaps.create_model("mine", classes=3)(torch.randn(1, 1, 32, 32)).shape == (1, 3)
        run = config.load(None, ["model.name=mine", "data.crop=24", "runtime.backend=torch"])
        model = build_model(run, classes=4, in_channels=2)
        assert model(torch.randn(1, 2, 24, 24)).shape == (1, 4)
        classes, in_channels, image_size, routing, runtime, options = calls[-1]
        assert (classes, in_channels, image_size) == (4, 2, 24) and routing == run.routing
        assert runtime.backend == "torch" and options == run.model.capsule_options()
        assert isinstance(emcaps.create_model("narrow"), emcaps.MatrixCapsNet)
        with pytest.raises(TypeError, match=r"model 'narrow' takes classes, in_channels; got an unexpected keyword "
                                            r"argument '(routing|runtime|image_size)' \(register_model lists what "
                                            r"run configs pass a builder\)"):
            build_model(config.load(None, ["model.name=narrow"]), classes=5, in_channels=1)
    finally:
        del _REGISTRY["mine"], _REGISTRY["narrow"]


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
