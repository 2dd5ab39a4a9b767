"""An exponential moving average of the weights (Polyak averaging), the model a run evaluates and exports.

Late in a run the test error of the raw weights jumps by a point or two from one check to the next (each
Adam step moves a capsule network's routing a lot); the average of the last few hundred steps' weights is
steadier and usually better. Training itself never sees the average: it follows the raw weights, so a run
with averaging computes exactly the same raw weights as one without.

The decay warms up as min(decay, (1 + step) / (10 + step)), so a short run (the demo, tests) is not
dominated by its initial weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    """Keeps `average`, a copy of `model` whose floating-point parameters and buffers follow an exponential
    moving average of the model's; other buffers (counters) are copied. (torch.optim.swa_utils.AveragedModel
    does the same but prefixes every key with 'module.' and has no warm-up; this one's state_dict is the
    model's own, so a checkpoint's average loads into a plain model.)"""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"weight-average decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.average = copy.deepcopy(model).eval()
        for p in self.average.parameters():
            p.requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """The decay used by the update after optimiser step `step` (1-based)."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Move the average towards `model`'s current weights: avg += (1 - decay) * (w - avg)."""
        weight = 1.0 - self.decay_at(step)
        averaged, current = [], []
        for a, w in zip(self.average.state_dict().values(), model.state_dict().values()):
            if a.is_floating_point():
                averaged.append(a)
                current.append(w.detach())
            else:
                a.copy_(w)
        if averaged:
            torch._foreach_lerp_(averaged, current, weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.average.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.average.load_state_dict(state)
