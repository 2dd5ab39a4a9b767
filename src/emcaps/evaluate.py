"""Evaluation: test error, confusion matrices, per-viewpoint error, and `evaluate_run`, what `emcaps eval` calls.

The metrics take plain tensors so that experiments and notebooks can use them on any model; running a model
over batches is emcaps.predict (re-exported here).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from emcaps.data.splits import eval_batches, load_split
from emcaps.data.transforms import MULTI_CROP_OFFSETS
from emcaps.predict import multi_crop_predict, predict, predict_reconstructing, to_probabilities
from emcaps.training.checkpoint import checkpoint_path, model_from_checkpoint
from emcaps.training.distributed import resolve_device
from emcaps.training.loop import check_backend

__all__ = ["confusion", "error_rate", "evaluate_run", "multi_crop_predict", "per_viewpoint_error", "predict",
           "predict_reconstructing", "summarise", "to_probabilities"]


def error_rate(predicted: Tensor | np.ndarray, labels: Tensor | np.ndarray,
               mask: Tensor | np.ndarray | None = None) -> float:
    """Fraction wrong among predicted (N,) vs labels (N,), only where mask (N,) is True if given; nan
    when no image counts."""
    wrong = np.asarray(predicted) != np.asarray(labels)
    if mask is not None:
        wrong = wrong[np.asarray(mask)]
    return float(wrong.mean()) if wrong.size else float("nan")


def confusion(predicted: Tensor | np.ndarray, labels: Tensor | np.ndarray, classes: int) -> np.ndarray:
    """(classes, classes) int64 counts; row = true class, column = predicted class."""
    predicted, labels = np.asarray(predicted, np.int64), np.asarray(labels, np.int64)
    matrix = np.zeros((classes, classes), np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def per_viewpoint_error(predicted: Tensor | np.ndarray, labels: Tensor | np.ndarray, azimuth: np.ndarray,
                        elevation: np.ndarray) -> dict[str, Any]:
    """Error for each (elevation, azimuth) seen: {'azimuths': [A], 'elevations': [L],
    'error': (L, A) nested lists (None where no image), 'count': (L, A)}."""
    wrong = np.asarray(predicted) != np.asarray(labels)
    azimuth, elevation = np.asarray(azimuth), np.asarray(elevation)
    azimuths, elevations = np.unique(azimuth), np.unique(elevation)
    errors = np.full((len(elevations), len(azimuths)), np.nan)
    counts = np.zeros((len(elevations), len(azimuths)), np.int64)
    for i, e in enumerate(elevations):
        for j, a in enumerate(azimuths):
            mask = (elevation == e) & (azimuth == a)
            counts[i, j] = mask.sum()
            if counts[i, j]:
                errors[i, j] = wrong[mask].mean()
    return {"azimuths": azimuths.tolist(), "elevations": elevations.tolist(),
            "error": [[None if np.isnan(v) else float(v) for v in row] for row in errors],
            "count": counts.tolist()}


def summarise(scores: Tensor, labels: Tensor, class_names: Sequence[str],
              meta: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Test error, confusion matrix, per-class error and (if meta has azimuth and elevation) per-viewpoint error."""
    predicted = scores.argmax(1).numpy()
    matrix = confusion(predicted, labels.numpy(), len(class_names))
    per_class = {name: (1.0 - matrix[k, k] / matrix[k].sum()) if matrix[k].sum() else None
                 for k, name in enumerate(class_names)}
    result: dict[str, Any] = {"images": len(labels), "test_error": error_rate(predicted, labels.numpy()),
                              "classes": list(class_names), "confusion": matrix.tolist(),
                              "per_class_error": per_class}
    if meta and "azimuth" in meta and "elevation" in meta:
        result["per_viewpoint"] = per_viewpoint_error(predicted, labels.numpy(), meta["azimuth"], meta["elevation"])
    return result


def evaluate_run(path: str | Path, multi_crop: bool = False, out_dir: str | Path | None = None,
                 device: str = "auto", overrides: Sequence[str] = (), batch_size: int | None = None,
                 quiet: bool = False) -> dict[str, Any]:
    """Evaluate a checkpoint (or run directory) on its test split; write results.json and PNG figures.

    overrides change the data section of the run's config (e.g. data.viewpoints.test_azimuths=novel) or how
    its routing runs (e.g. runtime.backend=torch).
    out_dir defaults to RUN_DIR/eval. Returns the results dict that results.json holds; for a capsule
    network with a decoder, tested on centre crops, it includes reconstruction_mse: the mean squared error
    per (standardised) pixel of the test images redrawn from their predicted class's pose (a blank image
    scores about 1).
    """
    from emcaps import config as cfgmod
    from emcaps import plots

    ckpt = checkpoint_path(path)
    for text in overrides:
        if not text.strip().startswith(("data.", "runtime.")):
            raise cfgmod.ConfigError(f"eval overrides may only change data.* and runtime.* keys, got {text!r}")
    dev = resolve_device(device)
    model, config, state = model_from_checkpoint(ckpt, dev)
    if overrides:
        config = cfgmod.from_dict(config.to_dict(), overrides)
        if hasattr(model, "set_runtime"):
            check_backend(config.runtime.backend, dev)
            model.set_runtime(config.runtime)
    data = load_split(config.data, "test", seed=config.train.seed, progress=not quiet and sys.stderr.isatty())
    bs = batch_size or config.train.eval_batch_size
    recon: dict[str, float] = {}
    if multi_crop:
        scores, labels = multi_crop_predict(model, data.images, data.labels, config.data.crop, batch_size=bs,
                                            device=dev)
    elif getattr(model, "decoder", None) is not None:
        scores, labels, errors = predict_reconstructing(model, eval_batches(data, bs, config.data.crop), dev)
        recon["reconstruction_mse"] = float(errors.mean())
    else:
        scores, labels = predict(model, eval_batches(data, bs, config.data.crop), dev)
    result = {"checkpoint": str(ckpt), "name": config.name, "model": config.model.name,
              "dataset": config.data.dataset, "params": sum(p.numel() for p in model.parameters()),
              "step": state["step"], "epoch": state["epoch"], "multi_crop": multi_crop,
              "crops": len(MULTI_CROP_OFFSETS) if multi_crop else 1,
              **summarise(scores, labels, data.class_names, data.meta), **recon}
    out = Path(out_dir) if out_dir is not None else ckpt.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-multicrop" if multi_crop else ""
    (out / f"results{suffix}.json").write_text(json.dumps(result, indent=1) + "\n")
    names = [n[:8] for n in data.class_names]
    plots.heatmap(out / f"confusion{suffix}.png", np.array(result["confusion"]), names, names,
                  title=f"{config.name}: test error {100 * result['test_error']:.2f}%",
                  xlabel="predicted class", ylabel="true class", unit="test images")
    if "per_viewpoint" in result:
        pv = result["per_viewpoint"]
        grid = np.array([[np.nan if v is None else 100 * v for v in row] for row in pv["error"]])
        plots.heatmap(out / f"viewpoint-error{suffix}.png", grid, [str(30 + 5 * e) for e in pv["elevations"]],
                      [str(a) for a in pv["azimuths"]], title="test error by viewpoint",
                      xlabel="azimuth (degrees)", ylabel="elevation (degrees)", vmax=100.0, unit="test error (%)")
    result["out_dir"] = str(out)
    return result
