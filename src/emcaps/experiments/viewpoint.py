"""Generalisation to novel viewpoints (the paper's section 4.1, Table 2).

Protocol: train the CNN and the capsule network on the familiar viewpoints only (azimuths 300..40, or the
3 lowest elevations). The CNN trains for its budget; the capsule network is stopped as soon as its error
on the familiar test viewpoints is no worse than the CNN's (or at its own budget). Then both are tested
on the novel viewpoints, and on every azimuth / elevation of the test set for the figure.

The comparison is only fair at equal familiar error. When the capsule network's budget ends before it
matches the CNN, the match is made from the other side: the CNN's test predictions were kept at regular
checks during its training, and the first check no worse than the capsule network's final familiar
error is reported as a third model, "CNN, stopped to match" (what the paper's protocol would give had
the CNN been the slower learner).

The trained capsule network also gets pictures: routing histograms and a parse map of one novel-viewpoint
test image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emcaps import plots, viz
from emcaps.config import ConfigError
from emcaps.data.smallnorb import ELEVATIONS_DEG, FAMILIAR_AZIMUTHS, FAMILIAR_ELEVATIONS
from emcaps.data.splits import eval_batches
from emcaps.data.transforms import center_crop
from emcaps.evaluate import error_rate, predict
from emcaps.experiments import common

SPLITS = ("azimuth", "elevation")
LABELS = {"cnn": "CNN", "capsules": "capsules", "cnn_matched": "CNN, stopped to match"}
# The capsule network's budget here is a ceiling (it stops when matched): 3,000 steps were too few to match
# the CNN (docs/experiments.md, "Novel viewpoints").
CAPSNET_STEPS = 6000
NEAR = 0.02            # CNN checks this near the capsule network's familiar error show the match's spread


def familiar_mask(split: str, meta: dict[str, np.ndarray]) -> np.ndarray:
    """True (N,) where an image's viewpoint is one of the familiar ones of `split`."""
    if split == "azimuth":
        return np.isin(meta["azimuth"], FAMILIAR_AZIMUTHS)
    return np.isin(meta["elevation"], FAMILIAR_ELEVATIONS)


def run_viewpoint(split: str = "azimuth", out_dir: str | Path = "viewpoint", fast: bool = False,
                  dataset: str = "synthnorb", root: str = "", seed: int = 0, quiet: bool = True,
                  device: str = "cpu", steps: int | None = None, capsnet_lr: float | None = None,
                  iterations: int | None = None, capsnet_steps: int | None = None,
                  routing: Sequence[str] = ()) -> dict[str, Any]:
    """Run the protocol for one split; writes results.json, results.md, error-per-<split>.png and the
    capsule network's pictures (routing-histograms.png, parse-map.png).
    `steps`, `capsnet_lr`, `iterations`, `capsnet_steps` and `routing` replace the defaults of `common.settings`
    (the capsule network's budget is CAPSNET_STEPS unless a step count is given, or in fast mode)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown viewpoint split {split!r}; expected one of {', '.join(SPLITS)}")
    if capsnet_steps is None and steps is None and not fast:
        capsnet_steps = CAPSNET_STEPS
    cfg = common.settings(fast, steps, capsnet_lr, iterations, capsnet_steps, routing)
    dev = common.device_of(device)
    key = "train_azimuths" if split == "azimuth" else "train_elevations"
    data_cfg = common.data_config(dataset, root, fast, **{key: "familiar"})
    train = common.load(data_cfg, "train")
    test = common.load(data_cfg, "test")                                     # every viewpoint
    if "azimuth" not in test.meta:
        raise ConfigError(f"data set {dataset!r} has no viewpoint labels")
    familiar = familiar_mask(split, test.meta)
    if familiar.all() or not familiar.any():
        raise ConfigError(f"the {dataset} test set needs both familiar and novel {split}s for this experiment")

    def classes(model) -> torch.Tensor:
        return predict(model, eval_batches(test, 64, 32))[0].argmax(1)              # (N,)

    def evaluate(model) -> dict[str, Any]:
        predicted = classes(model)
        return {"predicted": predicted, "familiar_error": error_rate(predicted, test.labels, familiar),
                "novel_error": error_rate(predicted, test.labels, ~familiar)}

    say = (lambda text: None) if quiet else (lambda text: print(text, flush=True))
    out = Path(out_dir)
    models: dict[str, dict[str, Any]] = {}
    cnn_checks: list[dict[str, Any]] = []          # the CNN's test predictions on the way, for matching

    def keep(model, step) -> bool:
        cnn_checks.append({"step": step, **evaluate(model)})
        return False

    cnn_every = max(1, cfg["check_every"] // 2)
    config = common.run_config("viewpoint", "cnn", data_cfg, "cnn", cfg["cnn"], seed, device)
    cnn, fitted = common.fit(config, out, "cnn", check_every=cnn_every, check=keep, quiet=quiet)
    models["cnn"] = {**common.describe_model(cnn, "cnn"), **fitted, **evaluate(cnn)}
    target = models["cnn"]["familiar_error"]
    say(f"CNN: familiar {common.pct(target)}, novel {common.pct(models['cnn']['novel_error'])}")

    checks: list[dict[str, float]] = []                    # the capsule network's familiar error on the way

    def matched(model, step) -> bool:
        checks.append({"step": step, "familiar_error": error_rate(classes(model), test.labels, familiar)})
        say(f"capsules step {step}: familiar {common.pct(checks[-1]['familiar_error'])} "
            f"(CNN {common.pct(target)})")
        return checks[-1]["familiar_error"] <= target

    config = common.run_config("viewpoint", "capsules", data_cfg, cfg["capsnet"], cfg["capsules"], seed,
                               device, routing=cfg["routing"], overrides=cfg["overrides"])
    caps, fitted = common.fit(config, out, "capsules", check_every=cfg["check_every"], check=matched,
                              quiet=quiet)
    models["capsules"] = {**common.describe_model(caps, cfg["capsnet"]), **fitted, **evaluate(caps)}
    models["capsules"]["matched"] = bool(models["capsules"]["familiar_error"] <= target)
    models["capsules"]["checks"] = checks
    say(f"capsules: familiar {common.pct(models['capsules']['familiar_error'])}, "
        f"novel {common.pct(models['capsules']['novel_error'])}")
    if not models["capsules"]["matched"]:
        final = {"step": models["cnn"]["steps"], "predicted": models["cnn"]["predicted"],
                 **{k: models["cnn"][k] for k in ("familiar_error", "novel_error")}}
        match = first_match([*cnn_checks, final], models["capsules"]["familiar_error"])
        models["cnn_matched"] = {**common.describe_model(cnn, "cnn"), "steps": match["step"],
                                 "check_every": cnn_every,
                                 **{k: match[k] for k in ("predicted", "familiar_error", "novel_error")}}
        say(f"CNN at step {match['step']}: familiar {common.pct(match['familiar_error'])}, "
            f"novel {common.pct(match['novel_error'])}")
    models["cnn"]["checks"] = [{k: c[k] for k in ("step", "familiar_error", "novel_error")}
                               for c in cnn_checks]

    values = np.unique(test.meta[split])
    per_view = {"values": values.tolist(), "familiar": [bool(familiar_mask(split, {split: np.array([v])})[0])
                                                        for v in values]}
    for name, m in models.items():
        per_view[name] = [error_rate(m["predicted"], test.labels, test.meta[split] == v) for v in values]
        del m["predicted"]
    x = values if split == "azimuth" else np.array([ELEVATIONS_DEG[v] for v in values])
    plots.line_plot(out / f"error-per-{split}.png",
                    {LABELS[name]: (x, [100 * e for e in per_view[name]]) for name in models},
                    title=f"test error per {split} (trained on the familiar {split}s)",
                    xlabel=f"{split} (degrees)", ylabel="test error (%)", ylim=(0, 100))
    # What the capsule network does with one novel-viewpoint test image.
    novel = int(np.flatnonzero(~familiar)[0])
    image = center_crop(test.images[novel:novel + 1], 32).to(dev)                # (1, C, 32, 32)
    viz.routing_histograms(caps, image, out / "routing-histograms.png", class_names=test.class_names)
    viz.parse_map(caps, image, out / "parse-map.png")
    figures = [f"error-per-{split}.png", "routing-histograms.png", "parse-map.png"]
    results = {"experiment": "viewpoint", "split": split, "dataset": dataset, "fast": fast, "seed": seed,
               "train_images": len(train), "test_images": len(test),
               "familiar_test_images": int(familiar.sum()), "budgets": common.budgets(cfg),
               "models": models, "per_view": per_view, "figures": figures}
    return common.write_results(out, results, _markdown(results))


def first_match(checks: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """The first of `checks` (in training order, each with a 'familiar_error') no worse than `target`,
    else the last one: where the protocol would have stopped that model."""
    if not checks:
        raise ValueError("no checks to match")
    return next((c for c in checks if c["familiar_error"] <= target), checks[-1])


def _markdown(r: dict[str, Any]) -> str:
    m = r["models"]
    rows = [[f"{LABELS[name]} ({m[name]['model']}, {m[name]['params']:,} params)",
             common.pct(m[name]["familiar_error"]),
             common.pct(m[name]["novel_error"]), m[name]["steps"]] for name in m]
    if m["capsules"]["matched"]:
        stop = "matched the CNN's familiar error"
    else:
        stop = (f"did not match the CNN's familiar error within its budget. At equal familiar error the "
                f"comparison is the last row: the CNN as it was at step {m['cnn_matched']['steps']}, the "
                f"first of its checks (every {m['cnn_matched']['check_every']} steps) no worse than the "
                f"capsule network's final familiar error. One check's error is noisy: the CNN's "
                f"{_near(m)}")
    return "\n".join([
        f"# Novel viewpoints: {r['split']}", "",
        f"Trained on the familiar {r['split']}s of {r['dataset']} ({r['train_images']} images); tested on "
        f"{r['test_images']} test images, {r['familiar_test_images']} of them at familiar viewpoints"
        f"{' (fast mode: a smoke test, not a result)' if r['fast'] else ''}.", "",
        common.markdown_table(["model", "familiar error", "novel error", "steps"], rows), "",
        f"Budgets: CNN {r['budgets']['cnn']['steps']} steps (Adam, lr {r['budgets']['cnn']['lr']:g}), "
        f"capsules at most {r['budgets']['capsules']['steps']} steps (Adam, lr "
        f"{r['budgets']['capsules']['lr']:g}{common.routing_text(r['budgets']['capsules'])}), "
        f"batch {r['budgets']['capsules']['batch_size']}.", "",
        f"The capsule network {stop}. The paper, smallNORB {r['split']}, novel / familiar: CNN "
        f"{'20% / 3.7%' if r['split'] == 'azimuth' else '17.8% / 4.3%'}, capsules "
        f"{'13.5% / 3.7%' if r['split'] == 'azimuth' else '12.3% / 4.3%'}.", "",
        *(["The capsule network's familiar-viewpoint error on the way (step: error): " + ", ".join(
            f"{c['step']}: {common.pct(c['familiar_error'])}" for c in m["capsules"]["checks"]) + ".", ""]
          if m["capsules"]["checks"] else []),
        f"![error per {r['split']}](error-per-{r['split']}.png)", "",
        "The capsule network on one novel-viewpoint test image: distances from the class layer's votes to "
        "each class capsule's mean after each routing iteration, weighted by assignment; and where the "
        "evidence for its winning class comes from.", "",
        "![routing histograms](routing-histograms.png)", "", "![parse map](parse-map.png)",
    ])


def _near(m: dict[str, Any]) -> str:
    """The spread of the CNN's novel error over its checks near the capsule network's familiar error."""
    history = [*m["cnn"]["checks"], m["cnn"]]
    near = [c["novel_error"] for c in history
            if abs(c["familiar_error"] - m["capsules"]["familiar_error"]) <= NEAR + 1e-9]
    return (f"{len(near)} checks within {100 * NEAR:g} points of that familiar error had novel error "
            f"{common.pct(min(near))} to {common.pct(max(near))}" if near else
            f"checks all missed that familiar error by more than {100 * NEAR:g} points")
