"""What the experiments share: data settings, the RunConfig of each model they train, training through
the loop of `emcaps train` (with checks that may stop it), and writing results (JSON + Markdown).

Every model an experiment trains is a RunConfig written beside its results as OUT/ROLE.toml, and trains
in OUT/runs/ROLE: `emcaps train --config OUT/ROLE.toml` trains the same model (early stopping aside).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from emcaps import config as cfgmod
from emcaps.config import (
    ConfigError,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)
from emcaps.data.config import ViewpointSplit
from emcaps.data.splits import ImageSet, load_split
from emcaps.models import count_parameters
from emcaps.routing import RoutingConfig, Runtime
from emcaps.training.checkpoint import model_from_checkpoint
from emcaps.training.distributed import resolve_device
from emcaps.training.loop import train

DATASETS = ("synthnorb", "smallnorb")


@dataclass(frozen=True)
class Budget:
    """How long and how one model trains: `steps` Adam steps of `batch_size` random crops, the learning
    rate following `schedule` (optim.lr_schedule). `run_config` turns it into train.max_steps,
    train.batch_size, optim.lr and optim.lr_schedule."""

    steps: int
    batch_size: int
    lr: float
    schedule: str = "cosine"


# The capsule network routes as the library's default RoutingConfig does: the paper's 3 EM iterations with
# emcaps' parameterisation (docs/research.md, "The default parameterisation").
ITERATIONS = RoutingConfig().iterations

# Fast mode: tiny SynthNORB at 32 px (no resizing), 'tiny' capsules; full mode: 48 px data, 'small' capsules.
# Both models follow the library's cosine lr schedule over their budget; the capsule network at peak lr 1e-2,
# the CNN at 1e-3 (each model's best in the runs of docs/research.md).
FAST = {"capsnet": "tiny", "capsules": Budget(4, 8, 1e-2), "cnn": Budget(8, 16, 1e-3), "check_every": 2,
        "test_limit": 64}
FULL = {"capsnet": "small", "capsules": Budget(3000, 32, 1e-2), "cnn": Budget(3000, 32, 1e-3),
        "check_every": 200, "test_limit": 2000}


def routing_overrides(overrides: Sequence[str]) -> tuple[str, ...]:
    """`--set` strings of an experiment, checked: each must set a `routing.` field (the capsule network's
    routing; the rest of every model is the experiment's protocol)."""
    for text in overrides:
        path, _ = cfgmod.parse_override(text)
        if len(path) != 2 or path[0] != "routing":
            raise ConfigError(f"--set {text!r}: an experiment takes routing.KEY=VALUE only (the capsule "
                              f"network's routing)")
    return tuple(overrides)


def settings(fast: bool, steps: int | None = None, capsnet_lr: float | None = None,
             iterations: int | None = None, capsnet_steps: int | None = None,
             routing: Sequence[str] = ()) -> dict[str, Any]:
    """The fast or full settings. `steps` replaces the training steps of the CNN and the capsule network,
    `capsnet_steps` then those of the capsule network alone (the early-stopping check runs at least 10
    times over the shorter budget), `capsnet_lr` the capsule network's Adam learning rate, `iterations`
    its routing iterations (default ITERATIONS), `routing` ('routing.KEY=VALUE' strings, applied after
    `iterations`) its routing fields: cfg['routing'] is the RoutingConfig they give, cfg['overrides'] the
    strings, which `run_config` applies to the whole capsule network config (a named parameterisation
    brings its initialisation)."""
    cfg = dict(FAST if fast else FULL)
    for option, value, names in (("--steps", steps, ("capsules", "cnn")),
                                 ("--capsnet-steps", capsnet_steps, ("capsules",))):
        if value is None:
            continue
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{option} must be a positive number of training steps, got {value}")
        for name in names:
            cfg[name] = replace(cfg[name], steps=value)
        cfg["check_every"] = max(1, min(cfg["check_every"], value // 10))
    if capsnet_lr is not None:
        if not (math.isfinite(capsnet_lr) and capsnet_lr > 0):
            raise ConfigError(f"--capsnet-lr must be a positive learning rate, got {capsnet_lr}")
        cfg["capsules"] = replace(cfg["capsules"], lr=capsnet_lr)
    if iterations is not None and (not isinstance(iterations, int) or iterations < 1):
        raise ConfigError(f"--routing-iterations must be a positive integer, got {iterations}")
    cfg["overrides"] = routing_overrides(routing)
    base = RunConfig(routing=RoutingConfig(iterations=ITERATIONS if iterations is None else iterations))
    cfg["routing"] = cfgmod.from_dict(base.to_dict(), cfg["overrides"]).routing     # checked here, before data
    return cfg


def budgets(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What each model's training was given, for results.json."""
    out = {name: asdict(cfg[name]) for name in ("cnn", "capsules")}
    out["capsules"]["routing_iterations"] = cfg["routing"].iterations
    out["capsules"]["routing_overrides"] = list(cfg["overrides"])
    return out


def routing_text(budget: dict[str, Any]) -> str:
    """', 3 routing iterations, routing.var_floor=5e-4' for a results page: the capsule network's routing
    iterations and the routing fields its command set ('' for the CNN)."""
    if "routing_iterations" not in budget:
        return ""
    return "".join([f", {budget['routing_iterations']} routing iterations",
                    *(f", {text}" for text in budget.get("routing_overrides", []))])


def device_of(name: str) -> torch.device:
    """'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'."""
    return resolve_device(name)


def data_config(dataset: str = "synthnorb", root: str = "", fast: bool = False, **views: str) -> DataConfig:
    """The data of an experiment: fast = the tiny SynthNORB subset at 32x32, else 48x48 with 32x32 crops.
    `views` are ViewpointSplit fields, e.g. train_azimuths='familiar'."""
    if dataset not in DATASETS:
        raise ConfigError(f"unknown data set {dataset!r}; expected one of {', '.join(DATASETS)}")
    size = 32 if fast else 48
    return DataConfig(dataset=dataset, root=root, synth_size=size, synth_subset="tiny" if fast else "small",
                      resize=size, crop=32, cameras="left", test_limit=settings(fast)["test_limit"],
                      viewpoints=ViewpointSplit(**views))


def load(cfg: DataConfig, split: str) -> ImageSet:
    return load_split(cfg, split)


# The experiments' models route whole batches and keep their tensors for the backward pass: on a CPU faster
# than recomputing chunks, and the experiments' batches are small.
WHOLE_BATCH = Runtime(recompute="no")


def run_config(experiment: str, role: str, data: DataConfig, model: str, budget: Budget, seed: int = 0,
               device: str = "cpu", routing: RoutingConfig | None = None, coord_add: bool = True,
               loss: str = "auto", overrides: Sequence[str] = ()) -> RunConfig:
    """The RunConfig (named EXPERIMENT-ROLE) of one model an experiment trains: `model` a preset of
    emcaps.models or 'cnn', budget.steps Adam steps, routing whole batches (WHOLE_BATCH), then
    `overrides` ('routing.KEY=VALUE', as `emcaps train --set`). The loop tests the model only at the end:
    the experiments measure what they need themselves."""
    config = RunConfig(
        name=f"{experiment}-{role}", data=data, model=ModelConfig(name=model, coord_add=coord_add),
        routing=routing or RoutingConfig(), runtime=WHOLE_BATCH,
        optim=OptimConfig(optimizer="adam", lr=budget.lr, lr_schedule=budget.schedule),
        loss=LossConfig(name=loss),
        train=TrainConfig(max_steps=budget.steps, batch_size=budget.batch_size, seed=seed, device=device,
                          eval_every=0))
    return cfgmod.from_dict(config.to_dict(), overrides) if overrides else config


def fit(config: RunConfig, out: Path, role: str, check_every: int = 0,
        check: Callable[[nn.Module, int], bool] | None = None, quiet: bool = True) -> tuple[nn.Module, dict]:
    """Train `config` with the loop of `emcaps train` into OUT/runs/ROLE (replacing a run there), after
    writing it to OUT/ROLE.toml. Every `check_every` steps before the last, `check(model, step)` may end
    training (True stops it). -> (the trained model, in eval mode on the config's device,
    {'steps', 'seconds', 'final_loss', 'stopped_early'})."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{role}.toml").write_text(config.to_toml())
    run_dir = out / "runs" / role
    if run_dir.exists():
        shutil.rmtree(run_dir)                # an experiment's runs are its own: a rerun starts afresh
    budget = config.train.max_steps

    def callback(step: int, model: nn.Module) -> bool:
        return bool(step % check_every == 0 and step < budget and check(model, step))

    summary = train(config, run_dir, quiet=quiet, callback=callback if check and check_every else None)
    model, _, _ = model_from_checkpoint(run_dir, resolve_device(config.train.device))
    return model, {k: summary[k] for k in ("steps", "seconds", "final_loss", "stopped_early")}


def describe_model(model: nn.Module, name: str) -> dict[str, Any]:
    return {"model": name, "params": count_parameters(model),
            "score_kind": getattr(model, "score_kind", "logit")}


def pct(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out: Path, results: dict[str, Any], markdown: str) -> dict[str, Any]:
    """results.json and results.md in `out`; returns results with their paths."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_plain) + "\n")
    (out / "results.md").write_text(markdown.rstrip() + "\n")
    return {**results, "out_dir": str(out)}


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
