"""What the experiments share: data settings, a compact training loop over an in-memory ImageSet,
test error, and writing results (JSON + Markdown).

The loop is deliberately smaller than `emcaps.train.train` (no run directory, checkpoints or DDP): an
experiment trains several models in one process and needs to stop one of them on a condition.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from emcaps.config import ConfigError, DataConfig, OptimConfig
from emcaps.data.transforms import center_crop, train_augment
from emcaps.losses import linear_margin
from emcaps.models import count_parameters, create_model
from emcaps.progress import progress_bar
from emcaps.routing import RoutingConfig
from emcaps.train import ImageSet, compute_loss, load_split, lr_factor

DATASETS = ("synthnorb", "smallnorb")


@dataclass(frozen=True)
class Budget:
    """How long and how one model trains: `steps` Adam steps of `batch_size` random crops, the learning
    rate following `schedule` ('constant' or 'cosine', as `emcaps train`'s optim.lr_schedule)."""

    steps: int
    batch_size: int
    lr: float
    schedule: str = "constant"


# The capsule network routes as the library's default RoutingConfig does: the paper's 3 EM iterations with
# emcaps' parameterisation (README, "Three routing iterations that learn").
ITERATIONS = RoutingConfig().iterations

# Fast mode: tiny SynthNORB at 32 px (no resizing), 'tiny' capsules; full mode: 48 px data, 'small' capsules.
# 'decoder' trains the PoseDecoder of the pose-perturbation picture on at most 'decoder_images' train images.
FAST = {"capsnet": "tiny", "capsules": Budget(4, 8, 1e-2), "cnn": Budget(8, 16, 1e-3), "check_every": 2,
        "test_limit": 64, "decoder": Budget(100, 32, 1e-3), "decoder_images": 256}
FULL = {"capsnet": "small", "capsules": Budget(3000, 32, 3e-3), "cnn": Budget(3000, 32, 1e-3),
        "check_every": 200, "test_limit": 2000, "decoder": Budget(3000, 64, 1e-3), "decoder_images": 4000}


def settings(fast: bool, steps: int | None = None, capsnet_lr: float | None = None,
             iterations: int | None = None, capsnet_steps: int | None = None) -> dict[str, Any]:
    """The fast or full settings. `steps` replaces the training steps of the CNN and the capsule network,
    `capsnet_steps` then those of the capsule network alone (the early-stopping check runs at least 10
    times over the shorter budget), `capsnet_lr` the capsule network's Adam learning rate, `iterations`
    its routing iterations (default ITERATIONS)."""
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
    cfg["routing"] = whole_batch_routing(iterations=ITERATIONS if iterations is None else iterations)
    return cfg


def budgets(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What each model's training was given, for results.json."""
    out = {name: asdict(cfg[name]) for name in ("cnn", "capsules", "decoder")}
    out["capsules"]["routing_iterations"] = cfg["routing"].iterations
    return out


def device_of(name: str) -> torch.device:
    """'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'."""
    from emcaps.train import resolve_device

    return resolve_device(name)


def data_config(dataset: str = "synthnorb", root: str = "", fast: bool = False, **views: str) -> DataConfig:
    """The data of an experiment: fast = the tiny SynthNORB subset at 32x32, else 48x48 with 32x32 crops.
    `views` are DataConfig viewpoint filters, e.g. train_azimuths='familiar'."""
    if dataset not in DATASETS:
        raise ConfigError(f"unknown data set {dataset!r}; expected one of {', '.join(DATASETS)}")
    size = 32 if fast else 48
    return DataConfig(dataset=dataset, root=root, synth_size=size, synth_subset="tiny" if fast else "small",
                      resize=size, crop=32, cameras="left", test_limit=settings(fast)["test_limit"], **views)


def load(cfg: DataConfig, split: str) -> ImageSet:
    return load_split(cfg, split)


def whole_batch_routing(**fields: Any) -> RoutingConfig:
    """RoutingConfig(**fields) that routes the whole batch at once and keeps its tensors for the backward
    pass: on a CPU several times faster than the chunked default, and the experiments' batches are small."""
    return RoutingConfig(**{"chunk": 0, "recompute": False, **fields})


def make_model(name: str, data: ImageSet, routing: RoutingConfig | None = None, coord_add: bool | None = None,
               device: torch.device | str = "cpu", seed: int | None = None, **fields: Any) -> nn.Module:
    """A model sized for `data` (classes, input channels); routing defaults to `whole_batch_routing()`.
    With `seed`, its initial weights depend on the seed alone, not on what drew random numbers before."""
    routing = routing or whole_batch_routing()
    if seed is not None:
        torch.manual_seed(seed)
    model = create_model(name, classes=data.classes, in_channels=data.images.shape[1],
                         routing=routing if name != "cnn" else None,
                         coord_add=coord_add if name != "cnn" else None, **fields)
    return model.to(device)


def default_loss(model: nn.Module) -> str:
    return "cross_entropy" if getattr(model, "score_kind", "logit") == "logit" else "spread"


def fit(model: nn.Module, data: ImageSet, budget: Budget, crop: int = 32, loss: str | None = None,
        seed: int = 0, check_every: int = 0,
        stop: Callable[[nn.Module, int], bool] | None = None, desc: str = "") -> dict[str, Any]:
    """Train on random crops (with brightness/contrast jitter) of data.images (N, C, S, S).

    The spread loss's margin rises linearly from 0.2 to 0.9 over the budget. Every `check_every` steps
    `stop(model, step)` may end training early. A non-empty `desc` draws a progress line on a terminal.
    -> {'steps', 'seconds', 'final_loss', 'stopped_early'}.
    """
    loss = loss or default_loss(model)
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=budget.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_factor(OptimConfig(lr=budget.lr, lr_schedule=budget.schedule), budget.steps))
    model.train()
    start, value, step, early = time.perf_counter(), math.nan, 0, False
    bar = progress_bar(budget.steps, desc, enabled=bool(desc), unit="step")
    while step < budget.steps:
        idx = torch.randint(0, len(data), (min(budget.batch_size, len(data)),), generator=g)
        x = train_augment(data.images[idx], crop, generator=g).to(device)
        scores = model(x)                                                   # (B, E)
        margin = linear_margin(step, budget.steps)
        out = compute_loss(loss, scores, data.labels[idx].to(device), margin)
        opt.zero_grad(set_to_none=True)
        out.backward()
        opt.step()
        schedule.step()
        value, step = float(out.detach()), step + 1
        if not math.isfinite(value):
            raise FloatingPointError(f"training diverged at step {step} (loss {value})")
        if not bar.disable:
            acc = float((scores.detach().argmax(1).cpu() == data.labels[idx]).float().mean())
            bar.set_postfix(loss=f"{value:.4f}", acc=f"{100 * acc:.1f}%", refresh=False)
            bar.update()
        due = stop is not None and check_every and step % check_every == 0 and step < budget.steps
        if due and stop(model, step):
            early = True
            break
    bar.close()
    model.eval()
    return {"steps": step, "seconds": time.perf_counter() - start, "final_loss": value,
            "stopped_early": early}


@torch.no_grad()
def predict(model: nn.Module, data: ImageSet, crop: int = 32, batch_size: int = 64) -> Tensor:
    """Predicted classes (N,) on the centre crops of data.images (N, C, S, S), in eval mode."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    parts = [model(center_crop(data.images[i:i + batch_size], crop).to(device)).argmax(1).cpu()
             for i in range(0, len(data), batch_size)]
    out = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    model.train(was_training)
    return out


def error(predicted: Tensor, labels: Tensor, mask: np.ndarray | None = None) -> float:
    """Fraction wrong among predicted (N,) vs labels (N,), optionally only where mask (N,) is True."""
    wrong = (predicted != labels).numpy()
    if mask is not None:
        wrong = wrong[mask]
    return float(wrong.mean()) if wrong.size else math.nan


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
