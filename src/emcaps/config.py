"""One config object per run: nested frozen dataclasses read from TOML, with `section.key=value` overrides.

A run's config is written beside its checkpoint (config.toml) and inside it, so a run can be resumed or
reproduced from its directory alone. Unknown keys and values of the wrong type or range raise ConfigError
naming the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import logging
import sys
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from emcaps.checks import ConfigError, at_least, choice, positive
from emcaps.data.config import DataConfig
from emcaps.models import CapsuleOptions, is_capsule_model, list_models
from emcaps.routing import PARAMETERISATIONS, RoutingConfig, Runtime
from emcaps.routing.config import CUSTOM, parameterisation

if sys.version_info >= (3, 11):
    import tomllib
else:                                            # the same parser, before it joined the standard library
    import tomli as tomllib


PRECISIONS = ("float32", "bf16")

log = logging.getLogger("emcaps")


@dataclass(frozen=True)
class _ModelName:
    name: str = "small"


@dataclass(frozen=True)
class ModelConfig(CapsuleOptions, _ModelName):       # fields: the name first, then the capsule options
    """name: a registered model (emcaps.models.list_models()): a capsule preset ('paper', 'small', 'tiny') or
    'cnn' (the baseline). The other fields are emcaps.models.CapsuleOptions, for capsule models only.
    conv_transform_std, class_transform_std, bias_init, primary_activation_offset, conv1_bias: see
    emcaps.models.CapsuleOptions; they follow `routing.parameterisation` unless set (its `init`,
    emcaps.routing.PARAMETERISATIONS).
    decoder: also redraw each image from its class capsule's pose, trained together with the network (see
    loss.reconstruction_weight)."""

    def __post_init__(self) -> None:
        choice("model.name", self.name, tuple(list_models()))
        super().__post_init__()
        if self.decoder and not is_capsule_model(self.name):
            raise ConfigError(f"model.decoder reconstructs from class capsule poses: it needs a capsule "
                              f"model, not {self.name!r}")


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and a per-step learning-rate schedule.

    lr_schedule: 'constant'; 'exponential' (lr * lr_decay ** (step / decay_steps), the authors' form);
                 'cosine' (from lr down to lr * min_lr_ratio over the run; the default: in runs of hours,
                 not the authors' days, the exponential form barely decays). warmup_steps ramp linearly.
    lr:          the peak learning rate. The default suits the capsule networks; the baseline CNN trains best
                 at 1e-3 (the converge-cnn config).
    grad_clip:   clip the global gradient norm to this (0 = off).
    """

    optimizer: str = "adam"
    lr: float = 1e-2
    weight_decay: float = 0.0
    momentum: float = 0.9
    lr_schedule: str = "cosine"
    lr_decay: float = 0.96
    decay_steps: int = 2000
    min_lr_ratio: float = 0.01
    warmup_steps: int = 0
    grad_clip: float = 0.0

    def __post_init__(self) -> None:
        choice("optim.optimizer", self.optimizer, ("adam", "adamw", "sgd"))
        choice("optim.lr_schedule", self.lr_schedule, ("constant", "exponential", "cosine"))
        positive("optim.lr", self.lr)
        at_least("optim.weight_decay", self.weight_decay, 0.0)
        if not 0 < self.lr_decay <= 1:
            raise ConfigError(f"optim.lr_decay must be in (0, 1], got {self.lr_decay}")
        at_least("optim.decay_steps", self.decay_steps, 1)
        at_least("optim.min_lr_ratio", self.min_lr_ratio, 0.0)
        at_least("optim.warmup_steps", self.warmup_steps, 0)
        at_least("optim.grad_clip", self.grad_clip, 0.0)


@dataclass(frozen=True)
class LossConfig:
    """The loss, and the margin of the spread loss.

    name:            'auto' (spread loss for capsules, cross-entropy for the CNN), 'spread', 'margin' or
                     'cross_entropy'.
    margin_schedule: how the spread loss's margin moves over the run: 'linear' from margin_start to margin_end
                     (the paper), 'sigmoid' (the authors' code, see sigmoid_steps), or 'constant' (margin_end).
    margin_start:    the margin at the first step, with margin_schedule 'linear'.
    margin_end:      the margin at the last step with margin_schedule 'linear', and at every step with
                     'constant'.
    sigmoid_steps:   with margin_schedule 'sigmoid', the margin is 0.2 + 0.79 sigmoid(min(10, step /
                     sigmoid_steps - 4)), whatever margin_start and margin_end say.
    reconstruction_weight: with model.decoder, the mean squared error per pixel of the reconstructions
                     (of standardised images) is added to the loss times this: small, so that classification
                     leads.
    """

    name: str = "auto"
    margin_schedule: str = "linear"
    margin_start: float = 0.2
    margin_end: float = 0.9
    sigmoid_steps: float = 50000.0
    reconstruction_weight: float = 0.05

    def __post_init__(self) -> None:
        choice("loss.name", self.name, ("auto", "spread", "margin", "cross_entropy"))
        choice("loss.margin_schedule", self.margin_schedule, ("linear", "sigmoid", "constant"))
        positive("loss.sigmoid_steps", self.sigmoid_steps)
        at_least("loss.reconstruction_weight", self.reconstruction_weight, 0.0)


@dataclass(frozen=True)
class TrainConfig:
    """The loop: how long it trains, on what, and when it checkpoints, tests and logs.

    epochs:        passes over the training set, unless max_steps is set.
    max_steps:     train for this many optimiser steps instead of `epochs` (0 = off); the last epoch then ends
                   early, and the lr and margin schedules span the steps.
    device:        'auto' (cuda if present, else cpu), 'cpu', 'cuda', 'cuda:1'...
    threads:       torch intra-op threads (0 = torch's default).
    checkpoint_minutes: write a checkpoint whenever this many minutes have passed since the last (> 0); one is
                   also written at the end of every epoch.
    checkpoint_steps: also write a checkpoint every this many steps (0 = off).
    eval_every:    test the model every this many epochs (0 = only at the end).
    eval_steps:    also test it every this many steps (0 = off), logged as 'eval' events in log.jsonl: a
                   learning curve.
    ema_decay:     evaluate, checkpoint and export an exponential moving average of the weights with this decay
                   (0 = off, the raw weights; see emcaps.training.averaging).
    precision:     'float32', or 'bf16': the training step's convolutions and loss run under bf16 autocast,
                   while capsule layers compute votes and routing statistics in float32 (emcaps.layers), and
                   the weights and optimiser stay in float32.
    deterministic: every operation takes its deterministic algorithm (torch.use_deterministic_algorithms,
                   CUBLAS_WORKSPACE_CONFIG), so a CUDA run repeats bit for bit and resumes exactly as a CPU run
                   does; slower on a GPU.
    """

    epochs: int = 10
    max_steps: int = 0
    batch_size: int = 32
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    checkpoint_minutes: float = 10.0
    checkpoint_steps: int = 0
    eval_every: int = 1
    eval_steps: int = 0
    eval_batch_size: int = 64
    log_every: int = 10
    ema_decay: float = 0.0
    precision: str = "float32"
    deterministic: bool = False

    def __post_init__(self) -> None:
        at_least("train.epochs", self.epochs, 1)
        choice("train.precision", self.precision, PRECISIONS)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        at_least("train.max_steps", self.max_steps, 0)
        at_least("train.batch_size", self.batch_size, 1)
        at_least("train.eval_steps", self.eval_steps, 0)
        at_least("train.eval_batch_size", self.eval_batch_size, 1)
        at_least("train.threads", self.threads, 0)
        at_least("train.checkpoint_steps", self.checkpoint_steps, 0)
        at_least("train.eval_every", self.eval_every, 0)
        at_least("train.log_every", self.log_every, 1)
        positive("train.checkpoint_minutes", self.checkpoint_minutes)
        index = self.device[5:] if self.device.startswith("cuda:") else None
        if not (self.device in ("auto", "cpu", "cuda") or (index is not None and index.isdigit())):
            raise ConfigError(f"train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides a run.

    name:    labels the run directory and logs.
    routing: the routing's mathematics, shared by every routed layer.
    runtime: only how the routing runs on the run's device, never what it computes (0 / 'auto': chosen for it).
    """

    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    runtime: Runtime = field(default_factory=Runtime)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())


# ---------------------------------------------------------------------------------------------------------
# Building configs from plain data, checking every key and type

def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Check one value against its field type; ints are accepted where floats are expected."""
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"config field {key} has unsupported type {kind}")
    if not ok:
        raise ConfigError(f"{key} must be {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _unknown(key: str, known: list[str]) -> ConfigError:
    prefix, _, leaf = key.rpartition(".")
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = (f" (did you mean {(prefix + '.' if prefix else '') + close[0]!r}?)" if close
            else f"; known: {', '.join(known)}")
    return ConfigError(f"unknown config key {key!r}{hint}")


# Keys whose spelling changed (the project spells its own names the British way): old full key -> new name.
# Configs and checkpoints written before the change still load.
RENAMED_KEYS = {"routing.normalize_cost": "normalise_cost"}


# How routing runs was part of [routing] before it became [runtime]: the old keys still load, into [runtime].
# Their old defaults, chosen for a CPU, are what every run then saved: a saved config drops those so that the
# device chooses. A user's file or override keeps every value it gives, and is told the key's new name.
MOVED_TO_RUNTIME = {"chunk": 0, "chunk_mb": 12.0, "native_chunk_mb": 12.0, "recompute": True, "backend": "auto"}


def _runtime_value(key: str, value: Any) -> Any:
    """An old routing.KEY value as runtime.KEY takes it: recompute was true or false, now 'yes' or 'no'."""
    return {True: "yes", False: "no"}[value] if key == "recompute" and isinstance(value, bool) else value


def _say_moved(key: str, where: str = "") -> None:
    log.warning("emcaps: %srouting.%s is now runtime.%s", where, key, key)


def _move_runtime_keys(data: dict[str, Any], where: str | None = None) -> dict[str, Any]:
    """`data` with its old routing.* runtime keys in [runtime], where a key [runtime] sets itself wins. `where`
    names the user's file they came from (each is then kept and named in a warning); None: a saved config."""
    routing = data.get("routing")
    if not isinstance(routing, dict) or not MOVED_TO_RUNTIME.keys() & routing.keys():
        return data
    moved = {k: v for k, v in routing.items() if k in MOVED_TO_RUNTIME}
    if where is None:
        moved = {k: v for k, v in moved.items() if v != MOVED_TO_RUNTIME[k]}
    else:
        for key in moved:
            _say_moved(key, f"{where}: ")
    runtime = data.get("runtime", {})
    if isinstance(runtime, dict):
        runtime = {**{k: _runtime_value(k, v) for k, v in moved.items()}, **runtime}
    return {**data, "routing": {k: v for k, v in routing.items() if k not in MOVED_TO_RUNTIME}, "runtime": runtime}


# The viewpoint filters were keys of [data] before they became [data.viewpoints]: they move there.
MOVED_TO_VIEWPOINTS = ("train_azimuths", "train_elevations", "test_azimuths", "test_elevations")


def _move_viewpoint_keys(data: dict[str, Any]) -> dict[str, Any]:
    moved = {k: data[k] for k in MOVED_TO_VIEWPOINTS if k in data}
    if not moved:
        return data
    views = data.get("viewpoints", {})
    views = {**moved, **views} if isinstance(views, dict) else views
    return {**{k: v for k, v in data.items() if k not in moved}, "viewpoints": views}


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """A (nested) config dataclass from a dict, rejecting unknown keys and ill-typed values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table, got {data!r}")
    if cls is RunConfig:
        data = _move_runtime_keys(data)
    if cls is DataConfig:
        data = _move_viewpoint_keys(data)
    types = _field_types(cls)
    values = {}
    for key, value in data.items():
        key = RENAMED_KEYS.get(prefix + key, key)
        full = prefix + key
        if key not in types:
            raise _unknown(full, list(types))
        kind = types[key]
        if is_dataclass(kind):
            values[key] = build(kind, value, full + ".")
        else:
            values[key] = _coerce(full, value, kind)
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:      # e.g. RoutingConfig's own validation
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.lr=1e-3' -> (['optim', 'lr'], 0.001). Values are TOML; a bare word is a string."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings to a plain config dict (a new dict; the input is unchanged). An old
    routing.* runtime key sets its runtime.* key, with a warning."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for text in overrides:
        path, value = parse_override(text)
        if len(path) == 2 and path[0] == "routing" and path[1] in MOVED_TO_RUNTIME:
            _say_moved(path[1])
            path, value = ["runtime", path[1]], _runtime_value(path[1], value)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return out


def resolve_parameterisation(data: dict[str, Any]) -> dict[str, Any]:
    """Fill the routing and model fields that `routing.parameterisation` names (emcaps.routing.PARAMETERISATIONS:
    its routing fields and its initialisation) wherever the config does not set them itself. A new dict.

    A config that names a parameterisation and sets one of its routing fields to another value contradicts
    itself: RoutingConfig refuses it (a ConfigError when it loads). Without the name the label is derived
    from the fields ('custom' where no name sets them all). (`from_dict` and `with_updates` first drop the
    named fields of a config whose name an override or update changes; one that changes a named field fills
    in the config's named fields, then drops its label.)
    """
    routing = data.get("routing")
    if not isinstance(routing, dict) or "parameterisation" not in routing:
        return data
    name = routing["parameterisation"]
    if not isinstance(name, str) or (name != CUSTOM and parameterisation(name) is None):
        raise ConfigError(f"routing.parameterisation must be one of "
                          f"{', '.join(repr(n) for n in (*PARAMETERISATIONS, CUSTOM))}; got {name!r}")
    model = data.get("model", {})
    if not isinstance(model, dict):
        return data                      # build() names the ill-formed section
    if name == CUSTOM:
        return data
    named = parameterisation(name)
    return {**data, "routing": {**named.routing, **routing}, "model": {**named.init, **model}}


def _without_named_fields(data: dict[str, Any]) -> dict[str, Any]:
    """`data` less the routing and model fields a parameterisation sets, so that a newly named one sets them."""
    out = dict(data)
    for section, keys in (("routing", _NAMED_ROUTING_FIELDS), ("model", _NAMED_MODEL_FIELDS)):
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k not in keys}
    return out


def from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """A RunConfig from plain data and overrides. An override naming `routing.parameterisation` replaces every
    field that parameterisation sets, also where `data` (a file, a saved run) sets it. Any other override
    changes only what it names: the fields `data`'s parameterisation sets keep its values otherwise, and an
    override of one of them makes the label follow the fields ('custom' where they differ from the name's)."""
    overrides = list(overrides)
    paths = [parse_override(text)[0] for text in overrides]
    if ["routing", "parameterisation"] in paths:
        data = _without_named_fields(data)
    elif any(path[:1] == ["routing"] and path[-1] in _NAMED_ROUTING_FIELDS for path in paths):
        data = _without_label(resolve_parameterisation(data))
    return build(RunConfig, resolve_parameterisation(apply_overrides(data, overrides)))


def from_saved(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """A RunConfig from a saved one (a checkpoint's), whose every field is set: its routing label is derived
    from those fields, so a run saved under a name whose definition later changed still loads."""
    data = _without_label(data)
    if isinstance(data.get("routing"), dict):     # saved before the anneal (or its cap) existed: trained without
        data = {**data, "routing": {"class_floor_start": 0.0, "class_floor_steps": 0, **data["routing"]}}
    return from_dict(data, overrides)


_NAMED_ROUTING_FIELDS = {key for named in PARAMETERISATIONS.values() for key in named.routing}
_NAMED_MODEL_FIELDS = {key for named in PARAMETERISATIONS.values() for key in named.init}


def _without_label(data: dict[str, Any]) -> dict[str, Any]:
    """`data` less its routing label: changing a field a parameterisation sets, without naming one, makes the
    label follow the fields (RoutingConfig derives it) instead of contradicting them."""
    routing = data.get("routing")
    if not isinstance(routing, dict) or "parameterisation" not in routing:
        return data
    return {**data, "routing": {k: v for k, v in routing.items() if k != "parameterisation"}}


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """A RunConfig from a TOML file (None = all defaults) plus overrides; `name` defaults to the file stem."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from None
        data = _move_runtime_keys(data, str(path))
        data.setdefault("name", path.stem)
    return from_dict(data, overrides)


def _named_config_dir() -> Path:
    """emcaps/configs/, installed with the package (setuptools installs packages as plain directories)."""
    return Path(str(importlib.resources.files("emcaps") / "configs"))


def named_configs() -> list[str]:
    """The names `--config NAME` accepts: the TOML files shipped in emcaps/configs/."""
    return sorted(path.stem for path in _named_config_dir().glob("*.toml"))


def named_config_path(name: str) -> Path | None:
    """emcaps/configs/NAME.toml if the package ships it (lets `--config quick` work from any install)."""
    candidate = _named_config_dir() / f"{name}.toml"
    return candidate if candidate.is_file() else None


def with_updates(config: RunConfig, **sections: dict[str, Any]) -> RunConfig:
    """A copy with some fields of some sections changed, checked like any other config."""
    data = config.to_dict()
    if "parameterisation" in sections.get("routing", {}):
        data = _without_named_fields(data)
    elif _NAMED_ROUTING_FIELDS & set(sections.get("routing", {})):
        data = _without_label(data)
    for section, values in sections.items():
        data[section] = {**data[section], **values}
    return from_dict(data)


# ---------------------------------------------------------------------------------------------------------
# Writing TOML (tomllib only reads): flat tables of scalars are all a config needs.

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    raise TypeError(f"cannot write {value!r} as a TOML value")


def dumps_toml(data: dict[str, Any], prefix: str = "") -> str:
    """A table's keys, then each of its sub-tables as [prefix.name]."""
    top = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    tables = [f"\n[{prefix}{k}]\n" + dumps_toml(v, f"{prefix}{k}.").rstrip("\n")
              for k, v in data.items() if isinstance(v, dict)]
    return "\n".join(top) + "\n" + "\n".join(tables) + "\n"

