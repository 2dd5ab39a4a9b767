"""`emcaps experiment reconstruct`: what the 16 pose entries of a class capsule say about a digit.

A capsule network with a reconstruction decoder is trained on MNIST by `emcaps train`'s loop (the real
5,000-digit sample by default, offline), next to the baseline CNN on the same split and budget. Then,
for a few test digits, the decoder redraws the digit from its class capsule's pose while one entry at a
time moves through a range scaled to how that entry varies over training digits of the class: the rows
of the picture show what each entry encodes (position, slant, width, stroke...). The page also gives the
test errors and the reconstruction error against the mean-image baseline (predicting the training
digits' mean image for every test digit).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from emcaps import config as cfgmod
from emcaps import plots, viz
from emcaps.config import ConfigError, RunConfig
from emcaps.data.splits import ImageSet, eval_batches, load_split
from emcaps.data.transforms import center_crop
from emcaps.experiments.common import markdown_table, pct, routing_overrides, write_results
from emcaps.models import MatrixCapsNet
from emcaps.predict import predict_reconstructing
from emcaps.training.checkpoint import CHECKPOINT_NAME, load_checkpoint, model_from_checkpoint
from emcaps.training.loop import resume, train

# Both models train from the packaged `mnist` config (emcaps/configs/mnist.toml): its data (28x28 digits padded
# to 36x36, random 32x32 crops), its schedule (30 epochs of batch 32, cosine lr, averaged weights) and the
# library's peak lr 1e-2 for the capsules; the CNN at its own lr, as in the other experiments.
CNN_LR = 1e-3
RECONSTRUCTION_WEIGHT = 1.0              # the capsule network's, unless --reconstruction-weight says otherwise
FAST = ["model.name=tiny", "train.epochs=1", "train.batch_size=16", "train.ema_decay=0",
        "data.train_limit=256", "data.test_limit=64"]
STEPS = 11                               # values of each pose entry in a row of the picture
SCALE_IMAGES = 1000                      # training digits whose poses set each entry's range


def experiment_configs(source: str = "sample", root: str = "", epochs: int | None = None, seed: int = 0,
                       device: str = "auto", fast: bool = False, threads: int = 0,
                       reconstruction_weight: float | None = None,
                       routing: Sequence[str] = ()) -> dict[str, RunConfig]:
    """The runs of the experiment: {'capsules': capsule network with decoder, 'cnn': the baseline}.
    epochs: both models' (None: the mnist config's 30; fast: 1); reconstruction_weight: the capsule
    network's loss.reconstruction_weight (None: RECONSTRUCTION_WEIGHT); routing: 'routing.KEY=VALUE'
    strings for the capsule network."""
    weight = RECONSTRUCTION_WEIGHT if reconstruction_weight is None else reconstruction_weight
    common = [f"data.mnist_source={source}", f"data.root={root}", f"train.seed={seed}",
              f"train.device={device}", f"train.threads={threads}", *(FAST if fast else [])]
    if epochs is not None:
        common.append(f"train.epochs={epochs}")
    mnist = cfgmod.named_config_path("mnist")
    capsules = cfgmod.load(mnist, [*common, "name=reconstruct-capsules", "model.decoder=true",
                                   f"loss.reconstruction_weight={weight}", *routing_overrides(routing)])
    cnn = cfgmod.load(mnist, [*common, "name=reconstruct-cnn", "model.name=cnn", f"optim.lr={CNN_LR}"])
    return {"capsules": capsules, "cnn": cnn}


def _what_decides(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict without the settings that only say how a run executes (device, threads)."""
    train_section = {k: v for k, v in config["train"].items() if k not in ("device", "threads")}
    return {**config, "train": train_section}


def train_or_reuse(config: RunConfig, run_dir: Path, quiet: bool) -> dict[str, Any]:
    """Train `config` into run_dir; a run of the same config already there is finished (or reused)."""
    if (run_dir / CHECKPOINT_NAME).is_file():
        saved = load_checkpoint(run_dir)["config"]
        if _what_decides(saved) != _what_decides(config.to_dict()):
            raise ConfigError(f"{run_dir} holds a run of another config; remove it or choose another --runs")
        return resume(run_dir, quiet=quiet)
    return train(config, run_dir, quiet=quiet)


def mean_image_mse(train_set: ImageSet, test_set: ImageSet, crop: int) -> float:
    """Mean squared error per pixel of predicting the training digits' mean centre crop for every test
    digit."""
    mean = center_crop(train_set.images, crop).mean(0, keepdim=True)              # (1, C, crop, crop)
    return float((center_crop(test_set.images, crop) - mean).pow(2).mean())


@torch.no_grad()
def pose_scales(model: MatrixCapsNet, data: ImageSet, crop: int, batch_size: int = 100) -> Tensor:
    """Per class and pose entry, the std over `data`'s digits of that class: (E, 16). It sets how far the
    picture moves each entry, since matrix capsule poses have no fixed scale."""
    poses = torch.cat([model.capsules(center_crop(data.images[i:i + batch_size], crop)).pose.flatten(2)
                       for i in range(0, len(data), batch_size)])                 # (N, E, 16)
    own = poses[torch.arange(len(data)), data.labels]                              # (N, 16)
    return torch.stack([own[data.labels == k].std(0) if (data.labels == k).sum() > 1
                        else own.std(0) for k in range(poses.shape[1])])


@torch.no_grad()
def perturbed_reconstructions(model: MatrixCapsNet, pose: Tensor, label: int, scale: Tensor,
                              offsets: Tensor) -> Tensor:
    """The decoder's images as each entry k of class `label`'s pose (E, 4, 4) moves by offsets (S,) times
    scale[k] (scale (16,)): (16, S, C, H, W), row k moving entry k (row k // 4, column k % 4)."""
    classes, steps = pose.shape[0], len(offsets)
    grid = pose.reshape(1, 1, classes, 16).repeat(16, steps, 1, 1)                  # (16, S, E, 16)
    entry = torch.arange(16)
    grid[entry, :, label, entry] += scale[:, None] * offsets[None, :]
    chosen = torch.full((16 * steps,), label, dtype=torch.long)
    images = model.decoder(grid.reshape(16 * steps, classes, 16), chosen)           # (16*S, C, H, W)
    return images.reshape(16, steps, *images.shape[1:])


def first_of_each_class(labels: Tensor, predicted: Tensor, count: int, correct: bool) -> list[int]:
    """Indices of the first test digit of classes 0, 1, ... (labels, predicted (N,)) until `count` are
    found; with `correct`, the first one classified correctly, where a class has one."""
    chosen = []
    for k in range(int(labels.max()) + 1 if len(labels) else 0):
        mine = labels == k
        if correct and (mine & (predicted == k)).any():
            mine = mine & (predicted == k)
        if mine.any():
            chosen.append(int(mine.nonzero()[0]))
        if len(chosen) == count:
            break
    return chosen


def run_reconstruct(out: str | Path, runs: str | Path = "runs/reconstruct", fast: bool = False,
                    source: str = "sample", root: str = "", epochs: int | None = None, seed: int = 0,
                    device: str = "auto", threads: int = 0, reconstruction_weight: float | None = None,
                    digits: int = 4, spread: float = 2.0, quiet: bool = False,
                    pretrained: str | None = None, routing: Sequence[str] = ()) -> dict[str, Any]:
    """Train (or reuse, under `runs`) the capsule network with decoder and the CNN, then write
    results.json, results.md, reconstructions.png, pose-perturbation.png and the two runs' configs
    (capsules.toml, cnn.toml) to `out`. With `pretrained` (weights shipped with emcaps, e.g. 'mnist'), draw
    from those instead, training nothing: the page then has no CNN row. routing: 'routing.KEY=VALUE'
    strings for the capsule network (not with `pretrained`, whose routing is the weights').

    spread: each pose entry moves through +-spread standard deviations (of that entry over the training
    digits of the class) in STEPS steps. digits: how many test digits get a panel.
    """
    if not (math.isfinite(spread) and spread > 0):
        raise ConfigError(f"--spread must be a positive number of standard deviations, got {spread}")
    if not 1 <= digits <= 10:
        raise ConfigError(f"--digits must be 1..10 (one digit per class), got {digits}")
    out = Path(out)
    if pretrained is not None:
        if routing:
            raise ConfigError("--set routing.* trains a model; shipped weights (--pretrained) keep their routing")
        model, configs, models = _shipped(pretrained, root)
    else:
        configs = experiment_configs(source, root, epochs, seed, device, fast, threads, reconstruction_weight,
                                     routing)
        models = _train_both(configs, Path(runs), quiet)
        model, _, _ = model_from_checkpoint(Path(runs) / "capsules", "cpu")
    config = configs["capsules"]
    seed = config.train.seed
    train_set, test_set = load_split(config.data, "train", seed), load_split(config.data, "test", seed)
    crop = config.data.crop
    scores, labels, errors = predict_reconstructing(model, eval_batches(test_set, 100, crop))
    predicted = scores.argmax(1)
    baseline = mean_image_mse(train_set, test_set, crop)
    redrawn_mse = float(errors.mean())

    out.mkdir(parents=True, exist_ok=True)
    for name, run_config in configs.items():                # `emcaps train --config OUT/NAME.toml` reruns one
        (out / f"{name}.toml").write_text(run_config.to_toml())
    inputs = center_crop(test_set.images, crop)
    shown = first_of_each_class(labels, predicted, 10, correct=False)
    with torch.no_grad():
        redrawn = model.reconstruct(inputs[shown]).images
    figure = viz.reconstructions_figure(inputs[shown, 0].numpy(), redrawn[:, 0].numpy(),
                                        [int(labels[i]) for i in shown], [int(predicted[i]) for i in shown])
    plots.save(figure, out / "reconstructions.png")

    scale_set = train_set.subset(torch.arange(min(len(train_set), SCALE_IMAGES)))
    scales = pose_scales(model, scale_set, crop)                                     # (E, 16)
    right = first_of_each_class(labels, predicted, digits, correct=True)
    offsets = torch.linspace(-spread, spread, STEPS)
    with torch.no_grad():
        poses = model.capsules(inputs[right]).pose                                   # (D, E, 4, 4)
    grids = torch.stack([perturbed_reconstructions(model, poses[d], int(labels[i]), scales[labels[i]],
                                                   offsets) for d, i in enumerate(right)])
    # grids: (D, 16, S, C, H, W)
    figure = viz.pose_perturbation_figure(inputs[right, 0].numpy(), grids[:, :, :, 0].numpy(),
                                          offsets.numpy(), [int(labels[i]) for i in right])
    plots.save(figure, out / "pose-perturbation.png")

    results = {
        "experiment": "reconstruct", "data": train_set.source, "train_images": len(train_set),
        "test_images": len(test_set), "fast": fast, "pretrained": pretrained, "models": models,
        "test_error": float((predicted != labels).float().mean()),
        "reconstruction_mse": redrawn_mse, "mean_image_mse": baseline,
        "reconstruction_weight": config.loss.reconstruction_weight,
        "perturbation": {"digits": [int(i) for i in right], "spread_std": spread, "steps": STEPS,
                         "scale_images": len(scale_set)},
        "figures": ["reconstructions.png", "pose-perturbation.png"],
    }
    return write_results(out, results, _markdown(results, configs))


def _train_both(configs: dict[str, RunConfig], runs: Path, quiet: bool) -> dict[str, dict[str, Any]]:
    """Train (or reuse) each run under `runs`; what the page says of each."""
    summaries = {name: train_or_reuse(config, runs / name, quiet) for name, config in configs.items()}
    return {name: {"model": configs[name].model.name, "params": summaries[name].get("params"),
                   "steps": summaries[name]["steps"], "epochs": summaries[name]["epochs"],
                   "lr": configs[name].optim.lr, "batch_size": configs[name].train.batch_size,
                   "test_error": summaries[name].get("test_error"),
                   "train_seconds": load_checkpoint(runs / name).get("seconds")}
            for name in configs}


def _shipped(name: str, root: str) -> tuple[MatrixCapsNet, dict[str, RunConfig], dict[str, dict[str, Any]]]:
    """The capsule network of shipped weights `name`, its config (data under `root` where given) and what the
    page says of it."""
    from emcaps import pretrained

    about = pretrained.info(name)
    model = pretrained.load(name)
    if getattr(model, "decoder", None) is None:
        raise ConfigError(f"pretrained weights {name!r} have no reconstruction decoder; weights with one: "
                          f"{', '.join(pretrained.with_decoder()) or 'none'}")
    config = cfgmod.from_saved(about["config"], [f"data.root={root}"] if root else [])
    info = {"model": config.model.name, "params": sum(p.numel() for p in model.parameters()),
            "steps": about["step"], "epochs": config.train.epochs, "lr": config.optim.lr,
            "batch_size": config.train.batch_size, "test_error": about["test_error"], "train_seconds": None,
            "command": about["command"]}
    return model, {"capsules": config}, {"capsules": info}


def _markdown(r: dict[str, Any], configs: dict[str, RunConfig]) -> str:
    caps, cnn = r["models"]["capsules"], r["models"].get("cnn")
    rows = [[f"capsules with decoder ({caps['model']}, {caps['params']:,} params incl. decoder)",
             pct(caps["test_error"]), caps["steps"], f"Adam {caps['lr']:g}"]]
    if cnn is not None:
        rows.append([f"CNN ({cnn['model']}, {cnn['params']:,} params)", pct(cnn["test_error"]), cnn["steps"],
                     f"Adam {cnn['lr']:g}"])
    trained = (f"Both trained for {caps['epochs']} epochs of batch {caps['batch_size']} on the same split from the "
               f"`mnist` config ({_schedule(configs['capsules'])})." if cnn is not None else
               f"The weights shipped with emcaps as {r['pretrained']!r}, trained for {caps['epochs']} epochs of "
               f"batch {caps['batch_size']} ({_schedule(configs['capsules'])}) by `{caps['command']}`; its test "
               f"error is the one stated with them, on the test digits of the same split.")
    timing = (f"Training time: capsules {_minutes(caps['train_seconds'])}, CNN {_minutes(cnn['train_seconds'])}."
              if cnn is not None else "")
    ratio = r["reconstruction_mse"] / r["mean_image_mse"]
    data = configs["capsules"].data
    return "\n".join([
        "# Reconstructing digits from a class capsule's pose", "",
        (f"Data: {r['data']}; {r['train_images']:,} training and {r['test_images']:,} test digits, padded by "
         f"{data.pad} pixels to 36x36, random {data.crop}x{data.crop} crops in training, centre crops for "
         f"testing."), "",
        markdown_table(["model", "test error", "steps", "optimiser"], rows), "",
        (f"{trained} The "
         f"decoder (the chosen class capsule's pose, batch-normalised entry by entry, in its class's slot "
         f"of an otherwise zero input -> 512 -> 1024 -> 32x32) trains with the network, its "
         f"mean squared error weighted by {r['reconstruction_weight']:g} in the loss, masked to the true "
         f"class in training and to the predicted class at test."), "",
        (f"Reconstruction error of the test digits, per standardised pixel: {r['reconstruction_mse']:.3f}, "
         f"against {r['mean_image_mse']:.3f} for the training digits' mean image ({100 * ratio:.0f}% of it; "
         f"a blank image scores about 1)."), "",
        ("Top: test digits (the first of each class; 'a->b' marks a digit of class a taken for b); bottom: "
         "their reconstructions from the predicted class capsule's pose."), "",
        "![reconstructions](reconstructions.png)", "",
        (f"Each panel below is one correctly classified test digit (shown on top). Row (r,c) redraws it as "
         f"entry (r,c) of its class capsule's 4x4 pose moves through +-{r['perturbation']['spread_std']:g} "
         f"standard deviations of that entry over the digits of its class among "
         f"{r['perturbation']['scale_images']:,} training digits, in {r['perturbation']['steps']} steps; the "
         f"middle column is the unperturbed pose."), "",
        "![pose perturbations](pose-perturbation.png)", "",
        timing,
    ])


def _schedule(config: RunConfig) -> str:
    averaged = (f", tested with weights averaged at decay {config.train.ema_decay:g}"
                if config.train.ema_decay else "")
    return f"{config.optim.lr_schedule} lr schedule{averaged}"


def _minutes(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds / 60:.1f} min"
