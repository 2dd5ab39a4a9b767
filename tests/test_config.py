"""Config files, overrides and validation: every mistake names the key and what was expected."""

import dataclasses
from pathlib import Path

import pytest
import torch

from emcaps import config
from emcaps.config import ConfigError, RunConfig
from emcaps.routing import RoutingConfig

CONFIGS = Path(config.__file__).with_name("configs")


def test_defaults_and_round_trip_through_toml(tmp_path):
    c = config.load(None, ["train.epochs=3", "routing.final_lambda=0.1", "name=x"])
    assert c.train.epochs == 3 and c.routing.final_lambda == 0.1 and c.name == "x"
    path = tmp_path / "run.toml"
    path.write_text(c.to_toml())
    assert config.load(path) == c


@pytest.mark.parametrize("name", ["paper", "small", "mnist", "quick", "converge", "converge-cnn"])
def test_named_configs_load(name):
    c = config.load(CONFIGS / f"{name}.toml")
    assert isinstance(c, RunConfig) and c.name == name
    assert config.named_config_path(name) == CONFIGS / f"{name}.toml"


CAPSULE_CONFIGS = [n for n in config.named_configs() if config.load(config.named_config_path(n)).model.name != "cnn"]


def _toml_routing(name: str) -> dict:
    return config.tomllib.loads((CONFIGS / f"{name}.toml").read_text()).get("routing", {})


@pytest.mark.parametrize("name", CAPSULE_CONFIGS)
def test_each_shipped_config_is_the_parameterisation_it_names(name):
    """Every shipped config names its parameterisation, and its routing is that parameterisation's (plus the
    fields it names a parameterisation for: none, or all of them under 'custom')."""
    from emcaps.routing import PARAMETERISATIONS

    c = config.load(config.named_config_path(name))
    claimed = _toml_routing(name).get("parameterisation")
    assert claimed is not None, f"{name}.toml does not name its routing parameterisation"
    assert c.routing.parameterisation == claimed
    if claimed != "custom":
        for key, value in PARAMETERISATIONS[claimed].routing.items():
            assert getattr(c.routing, key) == value, key


@pytest.mark.parametrize("name", CAPSULE_CONFIGS)
def test_each_shipped_capsule_config_starts_alive(name):
    """A fresh network of each config tells classes apart at initialisation: the class activations of random
    images spread over the classes by more than 0.02 (the `paper` config once started at 0.0004)."""
    import torch

    from emcaps.training.build import build_model

    c = config.load(config.named_config_path(name), ["runtime.backend=torch"])
    channels = 2 if c.data.cameras == "both" and c.data.dataset != "mnist" else 1
    torch.manual_seed(c.train.seed)
    model = build_model(c, 10 if c.data.dataset == "mnist" else 5, channels).eval()
    with torch.no_grad():
        scores = model(torch.randn(8, channels, c.data.crop, c.data.crop, generator=torch.Generator().manual_seed(0)))
    assert scores.std(1).mean() > 0.02


def test_named_configs_ship_inside_the_package():
    names = config.named_configs()
    assert {"paper", "small", "mnist", "quick", "converge", "converge-cnn"} <= set(names)
    assert config.named_config_path("no-such-config") is None


@pytest.mark.parametrize("text, key, value", [
    ("optim.lr=1e-3", ["optim", "lr"], 1e-3),
    ("train.epochs=4", ["train", "epochs"], 4),
    ("data.augment=false", ["data", "augment"], False),
    ("data.dataset=mnist", ["data", "dataset"], "mnist"),          # a bare word is a string
    ('data.root="/a b"', ["data", "root"], "/a b"),
])
def test_override_values_are_toml(text, key, value):
    assert config.parse_override(text) == (key, value)


def test_int_accepted_for_float_but_not_the_reverse():
    assert config.load(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match="train.epochs must be int"):
        config.load(None, ["train.epochs=1.5"])


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown config key 'train.epoch' (did you mean 'train.epochs'?)"),
    ("trian.epochs=3", "unknown config key 'trian'"),
    ("train.epochs=many", "train.epochs must be int"),
    ("train.epochs=0", "train.epochs must be >= 1"),
    ("model.name=huge", "model.name must be one of"),
    ("data.dataset=cifar", "data.dataset must be one of"),
    ("optim.lr=-1", "optim.lr must be a finite number > 0"),
    ("routing.iterations=0", "routing iterations must be an integer >= 1"),
    ("data.resize=16", "data.resize (16) must be 0 or at least data.crop (32)"),
    ("train=3", "train must be a table"),
    ("train.device=cuda:x", "train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'cuda:x'"),
    ("train.device=gpu", "train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    ("novalue", "must look like section.key=value"),
])
def test_bad_keys_and_values_are_named(override, message):
    with pytest.raises(ConfigError) as err:
        config.load(None, [override])
    assert message in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad)


def test_with_updates_validates():
    c = config.with_updates(RunConfig(), train={"epochs": 7})
    assert c.train.epochs == 7
    with pytest.raises(ConfigError):
        config.with_updates(RunConfig(), train={"epochs": -1})


@pytest.mark.parametrize("name", ["emcaps", "paper", "authors", "ibm"])
def test_routing_parameterisation_by_name_sets_routing_and_model(name, tmp_path):
    from emcaps.routing import PARAMETERISATIONS, RoutingConfig

    c = config.load(None, [f"routing.parameterisation={name}"])
    assert c.routing == RoutingConfig.named(name)
    for key, value in PARAMETERISATIONS[name].init.items():
        assert getattr(c.model, key) == value, key
    for key, value in PARAMETERISATIONS[name].routing.items():
        assert getattr(c.routing, key) == value, key
    path = tmp_path / "run.toml"
    path.write_text(c.to_toml())
    assert config.load(path) == c


def test_a_config_that_contradicts_its_named_parameterisation_says_so(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[routing]\nparameterisation = "authors"\nfinal_lambda = 0.02\n')
    contradiction = r"parameterisation 'authors' contradicts final_lambda = 0.02 \(it sets 0.01\)"
    with pytest.raises(ConfigError, match=contradiction):
        config.load(path)
    with pytest.raises(ConfigError, match="parameterisation 'ibm' contradicts var_floor"):
        config.load(None, ["routing.parameterisation=ibm", "routing.var_floor=1e-6"])
    # The model's initialisation is not part of the label: setting it keeps the name.
    path.write_text('[routing]\nparameterisation = "authors"\n\n[model]\nclass_transform_std = 0.1\n')
    c = config.load(path)
    assert (c.routing.parameterisation, c.model.class_transform_std, c.model.bias_init) == ("authors", 0.1, "authors")


def test_the_label_follows_the_fields_where_no_name_is_given(tmp_path):
    assert config.load(None).routing.parameterisation == "emcaps"
    c = config.load(None, ["routing.final_lambda=1.0"])
    assert c.routing.parameterisation == "custom" and c.routing.final_lambda == 1.0
    # A saved run names its parameterisation; an override of one of its fields relabels it instead of failing.
    path = tmp_path / "run.toml"
    path.write_text(config.load(None, ["routing.parameterisation=authors"]).to_toml())
    c = config.load(path, ["routing.final_lambda=0.02"])
    assert c.routing.parameterisation == "custom" and c.routing.centre_damping == 0.1
    assert config.with_updates(config.load(path), routing={"final_lambda": 0.01}).routing.parameterisation == "authors"
    # 'custom' takes the fields as they are, and round-trips.
    path.write_text('[routing]\nparameterisation = "custom"\nfinal_lambda = 3.0\n')
    c = config.load(path)
    assert c.routing.parameterisation == "custom" and c.routing.estep_temperature == RoutingConfig().estep_temperature
    path.write_text(c.to_toml())
    assert config.load(path) == c


@pytest.mark.parametrize("name, field, value", [("paper", "final_lambda", 0.1), ("authors", "var_floor", 1e-9)])
def test_an_override_of_a_named_field_keeps_the_names_other_fields_and_init(name, field, value, tmp_path):
    """A file naming a parameterisation, and a saved run of it, take an override of one of its routing fields
    as a change of that field alone: every other field, and the initialisation, stay the name's."""
    from emcaps.routing import PARAMETERISATIONS

    path = tmp_path / "run.toml"
    path.write_text(f'[routing]\nparameterisation = "{name}"\n')
    saved = config.load(path).to_dict()
    for c in (config.load(path, [f"routing.{field}={value}"]), config.from_saved(saved, [f"routing.{field}={value}"])):
        assert c.routing == RoutingConfig.named(name, **{field: value})
        assert c.routing.parameterisation == "custom"
        assert {key: getattr(c.model, key) for key in PARAMETERISATIONS[name].init} == PARAMETERISATIONS[name].init
    same = PARAMETERISATIONS[name].routing[field]
    assert config.load(path, [f"routing.{field}={same}"]).routing.parameterisation == name


@pytest.mark.parametrize("override", ["routing.parameterisation=google", "routing.parameterisation=3"])
def test_unknown_parameterisation_is_a_config_error(override):
    with pytest.raises(ConfigError, match="routing.parameterisation must be one of 'emcaps', 'paper', "
                                          "'authors', 'ibm', 'custom'; got"):
        config.load(None, [override])
    with pytest.raises(ConfigError, match="model.bias_init must be one of"):
        config.load(None, ["model.bias_init=ones"])


def test_naming_a_parameterisation_replaces_a_saved_configs_named_fields(tmp_path):
    """A saved run's config.toml sets every field; `--set routing.parameterisation=NAME` must still switch."""
    from emcaps.routing import RoutingConfig

    path = tmp_path / "run.toml"
    path.write_text(config.load(None, ["routing.parameterisation=authors", "routing.iterations=2"]).to_toml())
    c = config.load(path, ["routing.parameterisation=ibm"])
    assert c.routing == RoutingConfig.named("ibm", iterations=2)
    assert (c.model.bias_init, c.model.class_transform_std, c.model.conv1_bias) == ("ibm", 1.0, 0.0)
    c = config.load(path, ["routing.parameterisation=emcaps", "routing.iterations=3"])
    assert c.routing == RoutingConfig(iterations=3)
    c = config.with_updates(config.load(path), routing={"parameterisation": "paper"})
    assert c.routing == RoutingConfig.named("paper", iterations=2) and c.model.bias_init == "zeros"


def test_the_old_spelling_of_a_renamed_key_still_loads():
    """Configs and checkpoints from before the spelling was unified keep working."""
    old = config.from_dict({"routing": {"normalize_cost": True}})
    assert old.routing.normalise_cost and old == config.load(None, ["routing.normalise_cost=true"])
    assert config.load(None, ["routing.normalize_cost=true"]).routing.normalise_cost


@pytest.mark.parametrize("key, value, runtime", [
    ("recompute", "true", "yes"), ("recompute", "false", "no"), ("chunk", "4", 4), ("chunk_mb", "12", 12.0),
    ("native_chunk_mb", "12", 12.0), ("backend", '"torch"', "torch"), ("backend", '"auto"', "auto"),
])
def test_an_old_routing_runtime_key_sets_its_runtime_key_and_says_so(key, value, runtime, tmp_path, caplog):
    """routing.chunk, chunk_mb, native_chunk_mb, recompute and backend moved to [runtime]: given by a user, in
    an override or a file (`value` is TOML), each keeps its value there (recompute's true / false as 'yes' /
    'no'), and a warning names the new key. An override wins over a saved run's runtime."""
    moved = f"routing.{key} is now runtime.{key}"
    with caplog.at_level("WARNING", logger="emcaps"):
        assert getattr(config.load(None, [f"routing.{key}={value}"]).runtime, key) == runtime
    assert [r.getMessage() for r in caplog.records] == [f"emcaps: {moved}"]
    saved = config.load(None).to_dict()
    assert getattr(config.from_saved(saved, [f"routing.{key}={value}"]).runtime, key) == runtime
    caplog.clear()
    path = tmp_path / "old.toml"
    path.write_text(f"[routing]\n{key} = {value}\n")
    with caplog.at_level("WARNING", logger="emcaps"):
        assert getattr(config.load(path).runtime, key) == runtime
    assert [r.getMessage() for r in caplog.records] == [f"emcaps: {path}: {moved}"]


def test_a_saved_runs_old_routing_runtime_keys_load_quietly(caplog):
    """A checkpoint from before [runtime] saved every runtime key in [routing], its CPU defaults among them:
    they load without a word, the defaults left for the device to choose."""
    from emcaps.routing import Runtime

    saved = config.load(None).to_dict()
    del saved["runtime"]
    saved["routing"].update(chunk=0, chunk_mb=12.0, native_chunk_mb=12.0, recompute=True, backend="auto")
    with caplog.at_level("WARNING", logger="emcaps"):
        assert config.from_saved(saved).runtime == Runtime()
        saved["routing"].update(recompute=False, chunk_mb=64.0)
        assert config.from_saved(saved).runtime == Runtime(recompute="no", chunk_mb=64.0)
    assert not caplog.records


def test_the_viewpoint_filters_are_one_table_and_their_old_keys_still_load(tmp_path):
    """The novel-viewpoint experiment's split is [data.viewpoints]; files and checkpoints that set the filters
    in [data] itself, and overrides that name them there, land in it."""
    old = tmp_path / "old.toml"
    old.write_text('name = "run"\n[data]\ndataset = "synthnorb"\ntrain_azimuths = "familiar"\n')
    c = config.load(old, ["data.test_azimuths=novel"])
    assert (c.data.viewpoints.train_azimuths, c.data.viewpoints.test_azimuths) == ("familiar", "novel")
    assert c == config.load(None, ["data.viewpoints.train_azimuths=familiar", "data.viewpoints.test_azimuths=novel"])
    assert "[data.viewpoints]" in c.to_toml()
    saved = tmp_path / "saved.toml"
    saved.write_text(c.to_toml())
    assert config.load(saved) == c
    with pytest.raises(config.ConfigError, match="data.viewpoints.test_elevations must be one of"):
        config.load(None, ["data.viewpoints.test_elevations=sideways"])


def test_the_model_section_is_the_name_and_the_capsule_options():
    """ModelConfig does not restate CapsNetConfig: both are emcaps.models.CapsuleOptions, the name aside."""
    from dataclasses import fields

    from emcaps.models import CapsNetConfig, CapsuleOptions

    options = [f.name for f in fields(CapsuleOptions)]
    assert [f.name for f in fields(config.ModelConfig)] == ["name", *options]
    assert set(options) < {f.name for f in fields(CapsNetConfig)}
    c = config.load(None, ["model.class_transform_std=0.1"])
    assert c.model.capsule_options()["class_transform_std"] == 0.1
    with pytest.raises(config.ConfigError, match="model.conv_transform_std must be a finite number > 0"):
        config.load(None, ["model.conv_transform_std=-1"])


@pytest.mark.parametrize("floor, label", [(5e-4, "emcaps-0.1"), (1e-9, "custom")])
def test_a_config_saved_before_the_class_floor_keeps_its_one_floor(floor, label):
    """Runs saved as 'emcaps' before `class_var_floor` and the anneal existed routed every layer with one floor:
    they load with that maths (class_var_floor 0 = var_floor, no anneal), under the label of the earlier
    definition they match (the floor of 1e-9 without the anneal was never a released 'emcaps')."""
    saved = config.load(None).to_dict()
    saved["routing"] = {k: v for k, v in saved["routing"].items() if k not in ("class_var_floor", "class_floor_start")}
    saved["routing"].update(var_floor=floor, parameterisation="emcaps")
    routing = config.from_saved(saved).routing
    assert (routing.class_var_floor, routing.var_floor, routing.parameterisation) == (0.0, floor, label)
    assert routing.class_layer().var_floor == floor
    assert config.from_saved(config.load(None).to_dict()).routing.parameterisation == "emcaps"


def test_the_class_capsules_floor():
    from emcaps.routing import RoutingConfig

    default = RoutingConfig()
    assert (default.var_floor, default.class_var_floor, default.class_layer().var_floor) == (1e-9, 0.0, 1e-9)
    assert RoutingConfig.named("authors").class_layer().var_floor == 5e-4
    split = RoutingConfig(class_var_floor=5e-4)
    assert split.parameterisation == "custom" and split.class_layer().var_floor == 5e-4 and split.var_floor == 1e-9
    with pytest.raises(ValueError, match="class_var_floor must be >= 0"):
        RoutingConfig(class_var_floor=-1.0)
    with pytest.raises(ConfigError, match="contradicts class_var_floor"):
        config.load(None, ["routing.parameterisation=emcaps", "routing.class_var_floor=1e-3"])


def test_a_config_saved_before_the_anneal_keeps_training_without_it():
    """Runs saved before `class_floor_start` existed trained without the anneal: resumed, they go on so."""
    saved = config.load(None).to_dict()
    saved["routing"] = {k: v for k, v in saved["routing"].items() if k != "class_floor_start"}
    assert config.from_saved(saved).routing.class_floor_start == 0.0
    saved["routing"] = {k: v for k, v in saved["routing"].items() if k != "class_floor_steps"}
    assert config.from_saved(saved).routing.class_floor_steps == 0                # nor with the cap
    assert config.load(None).routing.class_floor_start == 5e-4            # a new run anneals


def test_the_class_floor_anneal_schedule():
    from emcaps.routing import RoutingConfig

    r = RoutingConfig(class_floor_start=1e-3, class_floor_anneal=0.5, var_floor=1e-9)
    assert r.class_floor_at(0, 100) == pytest.approx(1e-3)
    assert r.class_floor_at(25, 100) == pytest.approx(1e-3 ** 0.5 * 1e-9 ** 0.5)
    assert r.class_floor_at(50, 100) is None and r.class_floor_at(100, 100) is None      # the class floor's own
    assert RoutingConfig(class_floor_start=1e-3, class_var_floor=1e-6).class_floor_at(49, 100) > 1e-6
    assert RoutingConfig(class_floor_start=0.0).class_floor_at(0, 100) is None
    assert RoutingConfig().class_floor_at(0, 100) == pytest.approx(5e-4)
    assert r.class_layer(2e-4).var_floor == 2e-4 and r.class_layer().var_floor == 1e-9
    # class_floor_steps caps the anneal's length in a long run and leaves a short run's half alone
    capped = dataclasses.replace(r, class_floor_steps=600)
    assert capped.class_floor_at(300, 10_000) == pytest.approx(1e-3 ** 0.5 * 1e-9 ** 0.5)
    assert capped.class_floor_at(600, 10_000) is None and r.class_floor_at(600, 10_000) is not None
    assert all(capped.class_floor_at(k, 1000) == r.class_floor_at(k, 1000) for k in range(1000))
    with pytest.raises(ValueError, match="class_floor_anneal must be in"):
        RoutingConfig(class_floor_anneal=0.0)
    with pytest.raises(ValueError, match="class_floor_steps must be an integer >= 0"):
        RoutingConfig(class_floor_steps=-1)
    with pytest.raises(ConfigError, match="class_floor_start must be >= 0"):
        config.load(None, ["routing.class_floor_start=-1"])


def test_a_device_this_machine_lacks_is_named(monkeypatch):
    from emcaps.training.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)       # a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=r"device 'cuda:3' was asked for, but this machine has 1 GPU\(s\)"):
        resolve_device("cuda:3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device 'cuda:0' was asked for, but CUDA is not available"):
        resolve_device("cuda")
