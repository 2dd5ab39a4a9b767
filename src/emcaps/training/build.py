"""What a RunConfig builds for training: the model, the optimiser, the learning-rate and margin schedules
and the loss."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from emcaps import kernels
from emcaps.config import LossConfig, OptimConfig, RunConfig
from emcaps.losses import LOSSES, linear_margin, sigmoid_margin
from emcaps.models import create_model, is_capsule_model


def lr_factor(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier at a step (for LambdaLR)."""
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.lr_schedule == "exponential":
            return warm * cfg.lr_decay ** (step / cfg.decay_steps)
        if cfg.lr_schedule == "cosine":
            t = min(1.0, step / max(1, total_steps))
            return warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
        return warm
    return factor


def routing_path(model: nn.Module, device: torch.device) -> str | None:
    """How the model's routed layers will route on `device`, in words for the start of a run: whether the
    native kernels are in use, and on which threads, is what decides its speed."""
    layers = [m for m in model.modules() if hasattr(m, "uses_native")]
    if not layers:
        return None
    settings = layers[0].settings(device)
    if not layers[0].uses_native(torch.empty(0, device=device)):
        kind = "torch.compile" if settings.backend == "compile" else "PyTorch ops"
        return f"routing with {kind} ({layers[0].runtime.backend} backend; {settings.describe()})"
    lib = kernels.library()
    return f"routing on the native kernels ({'OpenMP' if lib.openmp else 'a thread pool'})"


def margin_at(cfg: LossConfig, step: int, total_steps: int) -> float:
    """The spread loss's margin at `step`: the schedule starts it small, so that early training separates
    the classes a little before it asks for the full margin."""
    if cfg.margin_schedule == "linear":
        return linear_margin(step, total_steps, cfg.margin_start, cfg.margin_end)
    if cfg.margin_schedule == "sigmoid":
        return sigmoid_margin(step, cfg.sigmoid_steps)
    return cfg.margin_end


def loss_name(config: RunConfig, model: nn.Module) -> str:
    """The loss a run trains with: 'auto' follows the model's `score_kind` (cross-entropy on logits, the spread
    loss on capsule activations)."""
    if config.loss.name != "auto":
        return config.loss.name
    return "cross_entropy" if getattr(model, "score_kind", "logit") == "logit" else "spread"


def compute_loss(name: str, scores: Tensor, target: Tensor, margin: float) -> Tensor:
    """scores (N, E), target (N,) -> scalar."""
    if name == "spread":
        return LOSSES["spread"](scores, target, margin)
    return LOSSES[name](scores, target)


def build_model(config: RunConfig, classes: int, in_channels: int) -> nn.Module:
    """The run's model for its data: every model gets the crop side as `image_size` (the CNN's classifier
    is sized by it), a capsule network also the run's routing, runtime and `model.*` options."""
    if not is_capsule_model(config.model.name):
        return create_model(config.model.name, classes=classes, in_channels=in_channels, image_size=config.data.crop)
    return create_model(config.model.name, classes=classes, in_channels=in_channels, routing=config.routing,
                        runtime=config.runtime, image_size=config.data.crop, **config.model.capsule_options())


def build_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    """The optimiser the run's `optim` section names, over `params` (a model's parameters or parameter groups)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
