"""Non-finite values in training: the error that stops a run, and where the values started."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite; the last good checkpoint is left in place."""


def first_nonfinite_parameter(model: nn.Module) -> str | None:
    """The name of the first parameter holding a NaN or an infinity, or None."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            return name
    return None


def first_nonfinite_module(model: nn.Module, x: Tensor) -> str | None:
    """Run the model once more with hooks; the first module (in call order) whose output is non-finite."""
    found: list[str] = []

    def tensors(output: Any) -> list[Tensor]:
        if isinstance(output, Tensor):
            return [output]
        try:                                      # tuples, Capsules(pose, activation)
            return [t for t in output if isinstance(t, Tensor)]
        except TypeError:
            return []

    def hook(name: str):
        def check(_module, _inputs, output) -> None:
            if not found and any(not torch.isfinite(t).all() for t in tensors(output)):
                found.append(name or "(model)")
        return check

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def diagnose(model: nn.Module, x: Tensor) -> str:
    """Where non-finite values start: a parameter, else a layer's output on this batch, else the loss."""
    param = first_nonfinite_parameter(model)
    if param:
        return f"first non-finite parameter: {param}"
    if not torch.isfinite(x).all():
        return "the input batch holds non-finite values"
    module = first_nonfinite_module(model, x)
    if module:
        return f"parameters are finite; first layer with non-finite output: {module}"
    return "parameters and layer outputs are finite; the loss itself is non-finite"
