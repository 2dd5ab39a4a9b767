"""Checkpoints: one file per run, replaced atomically, holding everything an exact resume needs (weights,
optimiser, schedule, every RNG, the data order's position) plus the run's config."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from emcaps import config as cfgmod
from emcaps.config import RunConfig
from emcaps.data.download import fsync_dir
from emcaps.training.build import build_model

log = logging.getLogger("emcaps")

CHECKPOINT_FORMAT = "emcaps-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or not one of ours."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file so that a crash at any moment leaves either the old file or the new one, whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or the checkpoint inside a run directory."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
        if not path.is_file():
            raise CheckpointError(f"{path.parent} holds no {CHECKPOINT_NAME}: not a run directory, or the run "
                                  f"never reached its first checkpoint")
    elif not path.is_file():
        raise CheckpointError(f"no checkpoint or run directory at {str(path)!r}")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and check a checkpoint (or RUN_DIR/checkpoint.pt); raises CheckpointError naming the problem."""
    path = checkpoint_path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:                                    # noqa: BLE001 - any failure means unreadable
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a readable emcaps checkpoint (corrupt, truncated or foreign): "
                              f"{first}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an emcaps checkpoint (no {CHECKPOINT_FORMAT!r} format marker)")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {state.get('version')!r}; this emcaps "
                              f"reads version {CHECKPOINT_VERSION}")
    missing = [k for k in ("config", "model", "step", "epoch") if k not in state]
    if missing:
        raise CheckpointError(f"{path} is missing {', '.join(missing)}")
    return state


def config_of(state: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    return cfgmod.from_saved(state["config"], overrides)


def model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, RunConfig,
                                                                                         dict[str, Any]]:
    """(model in eval mode, its config, the checkpoint) from a checkpoint or run directory: the run's
    weight average when it kept one (train.ema_decay), else its weights. A routing backend the run chose for
    another kind of device ('native' on CUDA, 'triton' on a CPU) becomes 'auto' on `device`, said in the log."""
    state = load_checkpoint(path)
    config = config_of(state)
    runtime = config.runtime.for_device(device)
    if runtime != config.runtime:
        log.info("emcaps: %s routed with backend %r, which does not run on %s; routing with 'auto'",
                 path, config.runtime.backend, device)
        config = dataclasses.replace(config, runtime=runtime)
    shape = state.get("data_shape", {})
    model = build_model(config, shape.get("classes", 5), shape.get("in_channels", 1))
    model.load_state_dict(state.get("ema_model", state["model"]))
    return model.to(device).eval(), config, state


def rng_state() -> dict[str, Any]:
    """Every generator a training step draws from (torch, cuda, numpy, python), as checkpointable data."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
