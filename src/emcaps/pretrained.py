"""Trained weights that ship inside the package: `create_model(name, pretrained=WEIGHTS)`, `emcaps eval
--pretrained WEIGHTS`.

Each file is an emcaps checkpoint cut to what a user needs (the run's averaged weights, its config, its
step): it loads offline with `torch.load(weights_only=True)` and carries the command that trained it and the
test error it measured, which `emcaps eval --pretrained` reproduces.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emcaps.config import ConfigError
from emcaps.training.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    load_checkpoint,
    model_from_checkpoint,
)

# name -> what it is (the files are emcaps/weights/NAME.pt)
ABOUT = {
    "synthnorb": "the small capsule network trained by the `converge` recipe on the full SynthNORB "
                 "(both cameras, 48x48 images, 32x32 crops)",
    "mnist": "the small capsule network with its reconstruction decoder, trained by the `mnist` config on the "
             "4,000 training digits of the real MNIST sample (`emcaps experiment reconstruct --pretrained`)",
}


def weights_dir() -> Path:
    return Path(str(importlib.resources.files("emcaps") / "weights"))


def list_pretrained() -> list[str]:
    """The weights this installation ships."""
    return [name for name in ABOUT if (weights_dir() / f"{name}.pt").is_file()]


def with_decoder() -> list[str]:
    """The shipped weights whose network has a reconstruction decoder (`emcaps experiment reconstruct
    --pretrained`)."""
    return [name for name in list_pretrained() if info(name)["config"]["model"].get("decoder")]


def weights_path(name: str) -> Path:
    """The file of the shipped weights `name`; a ValueError naming the ones there are otherwise."""
    if name not in list_pretrained():
        raise ConfigError(f"no pretrained weights named {name!r}; this emcaps ships: "
                         f"{', '.join(list_pretrained()) or 'none'}")
    return weights_dir() / f"{name}.pt"


def info(name: str) -> dict[str, Any]:
    """What the file says of itself: model, config, step, test_error, test_images, command."""
    state = load_checkpoint(weights_path(name))
    return {k: state.get(k) for k in ("step", "test_error", "test_images", "command")} | {
        "model": state["config"]["model"]["name"], "config": state["config"]}


def load(name: str, model: str | None = None, device: str | torch.device = "cpu", classes: int | None = None,
         in_channels: int | None = None) -> nn.Module:
    """The network of the shipped weights `name` in eval mode; with `model`, `classes` or `in_channels`, check
    that it is that model, for that many classes and channels (the weights fix them)."""
    net, config, state = model_from_checkpoint(weights_path(name), device)
    if model is not None and config.model.name != model:
        raise ValueError(f"pretrained weights {name!r} are for model {config.model.name!r}, not {model!r}")
    shape = state.get("data_shape", {})
    trained = {"classes": shape.get("classes", 5), "in_channels": shape.get("in_channels", 1)}
    for key, asked in (("classes", classes), ("in_channels", in_channels)):
        if asked is not None and asked != trained[key]:
            raise ValueError(f"pretrained weights {name!r} are for {key}={trained[key]}, not {key}={asked}: "
                             f"leave {key} out, or train a model of your own")
    return net


def export(run_dir: str | Path, out: str | Path, command: str, test_error: float | None = None,
           test_images: int | None = None) -> Path:
    """Write a run's averaged weights (its weights if it kept no average), config and step to `out`, with the
    command that trained it and the test error measured on `test_images` images.

    A reconstruction decoder's linear layers are stored in float16 (they load into float32): they are 96% of
    such a network and draw the same pictures. Everything else stays float32: the routing is conditioned for
    it, and the decoder's batch norm keeps pose variances far below float16's resolution."""
    state = load_checkpoint(run_dir)
    weights = state.get("ema_model", state["model"])
    slim = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": state["config"],
            "model": {k: v.half() if k.startswith("decoder.net.") else v.clone()
                      for k, v in weights.items()},
            "step": state["step"], "epoch": state["epoch"], "data_shape": state.get("data_shape", {}),
            "command": command, "test_error": test_error, "test_images": test_images}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(slim, out)
    return out
