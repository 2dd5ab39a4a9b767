"""How a capsule network routes, layer by layer: the numbers that say whether it can learn.

A routing that is correct can still give a network that does not learn: activations that all sit at 0.5
carry no signal, poses that shrink layer after layer leave the class capsules nothing but the coordinate
offsets, variances at their floor make the E-step's assignments one-hot. `routing_report` measures each
of these on a batch of images, for a freshly initialised network or a trained one (`emcaps diagnose`).

The routed layers run with a trace, so they take the PyTorch-ops path: the same mathematics as the native
kernels (tests prove it), with every iteration's tensors kept.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from emcaps.capsules import Capsules
from emcaps.config import ConfigError
from emcaps.layers import ConvCaps
from emcaps.models import MatrixCapsNet
from emcaps.routing import PositionCompetition, RoutingStep

LAYERS = ("conv_caps1", "conv_caps2", "class_caps")


def _spread(x: Tensor) -> float:
    """Mean over routing problems of the std across parent types: x (..., J). 0 = every type alike."""
    return float(x.std(-1, unbiased=False).mean()) if x.shape[-1] > 1 else 0.0


def assignment_entropy(r: Tensor, competition: PositionCompetition | None) -> float:
    """Mean normalised entropy (0 = one-hot, 1 = uniform) of each child's assignments over its parents.

    r: (M, J, I) assignments of child i of problem m to parent j. With `competition`, a child's parents are
    spread over the positions it feeds, and its entropy sums over all of them.
    """
    plogp = torch.where(r > 0, -r * torch.log(r.clamp_min(1e-30)), torch.zeros_like(r)).sum(1)   # (M, I)
    parents = torch.full_like(plogp, float(r.shape[1]))
    if competition is not None:
        plogp, parents = competition.child_sums(plogp), competition.child_sums(parents)
    usable = parents > 1
    if not usable.any():
        return float("nan")
    return float((plogp[usable] / torch.log(parents[usable])).mean())


def _iteration_row(step: RoutingStep, competition: PositionCompetition | None, var_floor: float) -> dict:
    logit = step.logit
    return {
        "lambda": step.inverse_temperature,
        "logit_min": float(logit.min()), "logit_max": float(logit.max()),
        "act_mean": float(step.activation.mean()), "act_std": float(step.activation.std()),
        "act_spread": _spread(step.activation),
        "var_at_floor": float((step.var < 2 * var_floor).float().mean()),
        "entropy": assignment_entropy(step.assignments, competition),
    }


@torch.no_grad()
def routing_report(model: MatrixCapsNet, images: Tensor) -> list[dict[str, Any]]:
    """One dict per capsule layer for images (N, C, H, W): activation mean / std / spread across types,
    pose and vote std, and for routed layers one row per EM iteration (inverse temperature, logit range,
    activations, fraction of variances at the floor, assignment entropy)."""
    if not isinstance(model, MatrixCapsNet):
        raise ValueError(f"routing diagnostics need a capsule network, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    caps = model.primary(F.relu(model.conv1(images)))
    rows: list[dict[str, Any]] = [_layer_row("primary", caps, None, [], None, 0.0)]
    for name in LAYERS:
        layer = getattr(model, name)
        votes, _ = layer.votes(caps)
        competition = None
        if isinstance(layer, ConvCaps) and layer.routing.compete_positions:
            h, w = caps.pose.shape[1:3]
            competition = PositionCompetition(h, w, layer.kernel, layer.stride, layer.in_types,
                                              device=images.device)
        trace: list[RoutingStep] = []
        caps = layer(caps, trace=trace)
        rows.append(_layer_row(name, caps, votes, trace, competition, layer.routing.var_floor))
    model.train(was_training)
    return rows


def _layer_row(name: str, caps: Capsules, votes: Tensor | None, trace: list[RoutingStep],
               competition: PositionCompetition | None, var_floor: float) -> dict[str, Any]:
    act = caps.activation
    pose = caps.pose.flatten(-2)                                     # (..., types, 16)
    return {
        "layer": name,
        "act_mean": float(act.mean()), "act_std": float(act.std()), "act_spread": _spread(act),
        "pose_std": float(pose.std()),
        "vote_std": float(votes.std()) if votes is not None else math.nan,
        "iterations": [_iteration_row(s, competition, var_floor) for s in trace],
    }


def format_report(rows: list[dict[str, Any]]) -> str:
    """The report as two plain-text tables: per layer, then per routing iteration."""
    lines = [f"{'layer':12s} {'act mean':>9s} {'act std':>9s} {'spread':>9s} {'pose std':>9s} {'vote std':>9s}"]
    for r in rows:
        lines.append(f"{r['layer']:12s} {r['act_mean']:9.3f} {r['act_std']:9.4f} {r['act_spread']:9.4f} "
                     f"{r['pose_std']:9.4f} {r['vote_std']:9.4f}")
    lines += ["", (f"{'layer':12s} {'iter':>4s} {'lambda':>8s} {'logit min':>10s} {'logit max':>10s} "
                   f"{'act mean':>9s} {'spread':>8s} {'var@floor':>9s} {'entropy':>8s}")]
    for r in rows:
        for i, it in enumerate(r["iterations"]):
            lines.append(f"{r['layer']:12s} {i + 1:4d} {it['lambda']:8.4f} {it['logit_min']:10.3f} "
                         f"{it['logit_max']:10.3f} {it['act_mean']:9.3f} {it['act_spread']:8.4f} "
                         f"{it['var_at_floor']:9.3f} {it['entropy']:8.3f}")
    lines.append("spread: std of activations across the parent types of one position, averaged; "
                 "var@floor: fraction of variances within 2x the floor; entropy: of each child's "
                 "assignments, 1 = uniform, 0 = one-hot (the assignments each iteration's M-step used)")
    return "\n".join(lines)


def gradient_norms(model: MatrixCapsNet, images: Tensor, labels: Tensor, margin: float = 0.2) -> dict[str, float]:
    """Norm of the spread loss's gradient wrt each layer's weights for images (N, C, H, W), labels (N,):
    how much of the training signal reaches the lower layers through the routing iterations."""
    from emcaps.losses import spread_loss

    model.zero_grad(set_to_none=True)
    spread_loss(model(images), labels, margin).backward()
    names = ("conv1", "primary.pose", "conv_caps1", "conv_caps2", "class_caps")
    norms = {name: float(model.get_submodule(name).weight.grad.norm()) for name in names}
    model.zero_grad(set_to_none=True)
    return norms


def diagnose(checkpoint: str | None = None, config: Any = None, images: int = 32,
             device: str = "auto") -> dict[str, Any]:
    """The routing report and gradient norms of a capsule network on `images` test images: the network of
    a checkpoint (or run directory), or, with `config` (a RunConfig), a fresh one initialised from its seed,
    on `device` ('auto', 'cpu', 'cuda' or 'cuda:N': routing on the device a run trains on).
    -> {'name', 'step', 'layers': routing_report(...), 'gradients': gradient_norms(...)}."""
    from dataclasses import replace

    from emcaps.data.splits import load_split
    from emcaps.data.transforms import center_crop
    from emcaps.training.build import build_model
    from emcaps.training.checkpoint import model_from_checkpoint
    from emcaps.training.distributed import resolve_device
    from emcaps.training.loop import check_backend

    if (checkpoint is None) == (config is None):
        raise ValueError("give a checkpoint or a config to diagnose, not both")
    if images < 2:
        raise ConfigError(f"diagnostics need at least 2 images, got {images}")
    step, dev = 0, resolve_device(device)
    if checkpoint is not None:
        model, config, state = model_from_checkpoint(checkpoint, dev)
        step = int(state["step"])
    check_backend(config.runtime.backend, dev)
    data = load_split(replace(config.data, test_limit=images), "test")
    if checkpoint is None:
        torch.manual_seed(config.train.seed)
        model = build_model(config, data.classes, data.images.shape[1]).to(dev)
    if not isinstance(model, MatrixCapsNet):
        raise ConfigError(f"routing diagnostics need a capsule network; model.name is {config.model.name!r}")
    x, labels = center_crop(data.images, config.data.crop).to(dev), data.labels.to(dev)
    return {"name": config.name, "step": step, "layers": routing_report(model, x),
            "gradients": gradient_norms(model, x, labels)}


PRECISIONS = ("float32", "bf16")


@torch.no_grad()
def precision_error(model: torch.nn.Module, images: Tensor, precision: str = "float32") -> float:
    """How far rounding moves a network's class scores: the largest difference, over images (N, C, H, W) and
    classes, between the scores of `model` run in `precision` and those of a float64 copy of it.

    'float32' runs the model as it is (its parameters in float32); 'bf16' runs it under bf16 autocast on the
    images' device. A well-conditioned network moves by rounding's size (about 1e-6 in float32); one whose
    routing divides by differences that rounding erases moves by orders of magnitude more.
    """
    import copy

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    twin = copy.deepcopy(model).double().eval()
    reference = twin(images.double())
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            scores = model(images.float())
    finally:
        model.train(was_training)
    return float((scores.double() - reference).abs().max())
