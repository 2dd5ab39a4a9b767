"""Losses on class scores and the margin schedules of the spread loss.

All losses take floating-point scores (N, E) and integer class indices (N,) in [0, E) and return the batch
mean. The range of the indices is checked on CPU tensors only: on CUDA the check would wait for the device,
and an index out of range stops the kernel that reads it with a device-side assertion instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _check(scores: Tensor, target: Tensor) -> Tensor:
    """Raise where torch would fail inside gather or one_hot, or silently broadcast; -> target as int64 (gather,
    one_hot and cross_entropy take no other integer type)."""
    if scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor of shape (N, E), got {scores.dtype} "
                         f"{tuple(scores.shape)}")
    if target.shape != scores.shape[:1]:
        raise ValueError(f"target must have shape ({scores.shape[0]},), got {tuple(target.shape)}")
    if target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got {target.dtype}: convert it with target.long()")
    if target.device.type == "cpu" and len(target) and not 0 <= target.min() <= target.max() < scores.shape[1]:
        raise ValueError(f"target must hold class indices in [0, {scores.shape[1]}), got values from "
                         f"{target.min().item()} to {target.max().item()}")
    return target.long()


def spread_loss(activations: Tensor, target: Tensor, margin: float) -> Tensor:
    """sum over wrong classes i of max(0, m - (a_t - a_i))^2, mean over the batch.

    activations (N, E), target (N,) class indices.
    """
    target = _check(activations, target)
    a_t = activations.gather(1, target.unsqueeze(1))                    # (N, 1)
    gap = F.relu(margin - (a_t - activations)) ** 2                     # (N, E); the target's own term is m^2
    wrong = torch.ones_like(gap).scatter_(1, target.unsqueeze(1), 0.0)
    return (gap * wrong).sum(1).mean()


def margin_loss(activations: Tensor, target: Tensor, m_plus: float = 0.9, m_minus: float = 0.1,
                down_weight: float = 0.5) -> Tensor:
    """The margin loss of Sabour et al. 2017, on activations (N, E)."""
    target = _check(activations, target)
    t = F.one_hot(target, activations.shape[1]).to(activations.dtype)
    loss = t * F.relu(m_plus - activations) ** 2 + down_weight * (1 - t) * F.relu(activations - m_minus) ** 2
    return loss.sum(1).mean()


def cross_entropy(scores: Tensor, target: Tensor) -> Tensor:
    """Softmax cross-entropy with the scores as logits."""
    target = _check(scores, target)
    return F.cross_entropy(scores, target)


def linear_margin(step: int, total_steps: int, start: float = 0.2, end: float = 0.9) -> float:
    """The paper's schedule: the margin rises linearly from `start` to `end` over training."""
    if total_steps <= 1:
        return end
    frac = min(max(step / (total_steps - 1), 0.0), 1.0)
    return start + (end - start) * frac


def sigmoid_margin(step: int, steps_per_unit: float = 50000.0) -> float:
    """The authors' code: 0.2 + 0.79 * sigmoid(min(10, step / 50000 - 4))."""
    x = min(10.0, step / steps_per_unit - 4.0)
    return 0.2 + 0.79 / (1.0 + math.exp(-x))


LOSSES = {"spread": spread_loss, "margin": margin_loss, "cross_entropy": cross_entropy}
