"""`emcaps demo`: the quick start's main job, offline, in a few minutes on a laptop CPU.

It renders SynthNORB at low resolution (once, into the user cache), trains the small capsule network
and the baseline CNN on the training instances, tests both on unseen object instances, and writes a
report folder: report.md, results.json and PNG figures (data montage, training curves, confusions).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emcaps import config as cfgmod
from emcaps import plots
from emcaps.config import RunConfig
from emcaps.data.splits import eval_batches, load_split
from emcaps.evaluate import predict, summarise
from emcaps.training.checkpoint import model_from_checkpoint
from emcaps.training.loop import train

# The demo's settings, as config overrides (the same keys `emcaps train --set` takes).
DATA = {
    "full": ["data.dataset=synthnorb", "data.synth_size=48", "data.synth_subset=small", "data.resize=48",
             "data.crop=32", "data.cameras=left", "data.test_limit=1000"],
    "quick": ["data.dataset=synthnorb", "data.synth_size=36", "data.synth_subset=tiny", "data.resize=36",
              "data.crop=32", "data.cameras=left", "data.train_limit=256", "data.test_limit=128"],
}
# Both models see the whole training set within a few minutes on 2 cores. The capsules train with the
# library's defaults (3 EM iterations, emcaps' parameterisation, initialisation, spread loss, Adam at peak lr
# 1e-2 under the cosine schedule) and test every other epoch; the CNN at its own lr, testing every epoch.
CAPSULES = ["train.batch_size=32", "train.eval_every=2"]
MODELS = {
    "full": {
        "capsules": ["model.name=small", *CAPSULES, "train.epochs=12"],
        "cnn": ["model.name=cnn", "optim.lr=1e-3", "train.batch_size=32", "train.epochs=6"],
    },
    "quick": {
        "capsules": ["model.name=tiny", *CAPSULES, "train.epochs=2"],
        "cnn": ["model.name=cnn", "optim.lr=1e-3", "train.batch_size=32", "train.epochs=2"],
    },
}
COMMON = ["train.seed=0", "train.checkpoint_minutes=5", "train.log_every=2"]
LABELS = {"capsules": "capsules", "cnn": "CNN"}


def demo_configs(quick: bool = False, capsules: Sequence[str] = ()) -> dict[str, RunConfig]:
    """The two runs of the demo: 'capsules' and 'cnn' (a run's own overrides come last, so they win; then
    `capsules`, overrides of the capsule network's run, e.g. 'routing.var_floor=5e-4')."""
    size = "quick" if quick else "full"
    extra = {"capsules": list(capsules), "cnn": []}
    return {name: cfgmod.from_dict({"name": f"demo-{name}"}, DATA[size] + COMMON + overrides + extra[name])
            for name, overrides in MODELS[size].items()}


def _events(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == kind]


def _montage(cfg: RunConfig, out: Path) -> Path:
    """Ten test images of each class (unseen instances), as the models see them before cropping."""
    test = load_split(cfg.data, "test", seed=cfg.train.seed)
    rows, names = [], []
    for k, name in enumerate(test.class_names):
        idx = np.flatnonzero(test.labels.numpy() == k)[:10]
        if len(idx):
            rows.append(test.images[idx, 0].numpy())
            names.append(name)
    images = np.concatenate(rows)
    return plots.image_grid(out / "data.png", images, columns=10, scale=2, labels=names,
                            title="test images of unseen object instances, before cropping")


def run_demo(out_dir: str | Path = "demo-report", quick: bool = False, quiet: bool = False,
             capsules: Sequence[str] = ()) -> dict[str, Any]:
    """Train and test both models, write the report into out_dir; returns the results."""
    t0 = time.monotonic()
    out = Path(out_dir)
    runs = out / "runs"
    if runs.exists():
        shutil.rmtree(runs)                   # a demo always starts fresh; only its own run folders go
    out.mkdir(parents=True, exist_ok=True)
    configs = demo_configs(quick, capsules)
    first = next(iter(configs.values()))

    def note(text: str) -> None:
        if not quiet:
            print(text, file=sys.stderr, flush=True)

    note(f"emcaps demo: SynthNORB ({first.data.synth_subset} subset, {first.data.synth_size} px), "
         f"rendered once into the user cache")
    load_split(first.data, "train", seed=first.train.seed, progress=not quiet and sys.stderr.isatty())
    render_s = time.monotonic() - t0
    _montage(first, out)

    results: dict[str, Any] = {}
    for name, cfg in configs.items():
        note(f"-- training {LABELS[name]} ({cfg.model.name})")
        started = time.monotonic()
        train(cfg, runs / name, quiet=quiet)
        seconds = time.monotonic() - started
        model, _, state = model_from_checkpoint(runs / name)
        test = load_split(cfg.data, "test", seed=cfg.train.seed)
        scores, labels = predict(model, eval_batches(test, cfg.train.eval_batch_size, cfg.data.crop))
        summary = summarise(scores, labels, test.class_names)
        names = [n[:8] for n in test.class_names]
        plots.heatmap(out / f"confusion-{name}.png", np.array(summary["confusion"]), names, names,
                      title=f"{LABELS[name]}: test error {100 * summary['test_error']:.1f}%",
                      xlabel="predicted class", ylabel="true class", unit="test images")
        results[name] = {"model": cfg.model.name, "params": state["params"], "test_error": summary["test_error"],
                         "test_images": summary["images"], "train_seconds": round(seconds, 1),
                         "batch_size": cfg.train.batch_size, "epochs": _events(runs / name, "epoch"),
                         "steps": _events(runs / name, "step"), "confusion": summary["confusion"],
                         "per_class_error": summary["per_class_error"], "config": cfg.to_dict()}
    _curves(results, out)
    total_s = time.monotonic() - t0
    report = {"quick": quick, "render_seconds": round(render_s, 1), "total_seconds": round(total_s, 1),
              "data": dataclasses.asdict(first.data), "results": results}
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(_markdown(report))
    table = _table(results)
    print(table)
    print(f"report: {out / 'report.md'} ({total_s:.0f} s in all)")
    return report


def _curves(results: dict[str, Any], out: Path) -> None:
    test = {LABELS[n]: ([e["epoch"] for e in r["epochs"] if "test_error" in e],
                        [100 * e["test_error"] for e in r["epochs"] if "test_error" in e]) for n, r in results.items()}
    plots.line_plot(out / "test-error.png", test, title="test error on unseen instances", xlabel="epoch",
                    ylabel="test error (%)", ylim=(0, 100))
    train = {}
    for name, r in results.items():
        steps = r["steps"]
        err = np.array([100 * (1 - s["acc"]) for s in steps])
        smooth = np.convolve(err, np.ones(5) / 5, mode="valid") if len(err) >= 5 else err
        seen = np.array([s["step"] * r["batch_size"] for s in steps])[len(err) - len(smooth):]
        train[LABELS[name]] = (seen, smooth)
    plots.line_plot(out / "train-error.png", train, title="training error (augmented crops, smoothed)",
                    xlabel="training images seen", ylabel="training error (%)", ylim=(0, 100))


def _table(results: dict[str, Any]) -> str:
    lines = ["| model | preset | parameters | test error | training time |", "| --- | --- | ---: | ---: | ---: |"]
    for name, r in results.items():
        lines.append(f"| {LABELS[name]} | {r['model']} | {r['params']:,} | {100 * r['test_error']:.1f}% | "
                     f"{r['train_seconds']:.0f} s |")
    return "\n".join(lines)


def _markdown(report: dict[str, Any]) -> str:
    d = report["data"]
    quick = " --quick" if report["quick"] else ""
    caps = report["results"]["capsules"]["config"]
    routing = ", ".join(f"{k}={v}" for k, v in caps["routing"].items())
    settings = "\n".join(f"- {LABELS[n]}: `{' '.join(MODELS['quick' if report['quick'] else 'full'][n])}`"
                         for n in report["results"])
    return f"""# emcaps demo report

Command: `emcaps demo{quick}`. Total time {report['total_seconds']:.0f} s (rendering and loading the data:
{report['render_seconds']:.0f} s).

Data: SynthNORB, the built-in rendered stand-in for smallNORB ({d['synth_subset']} subset of viewpoints and
lightings, rendered at {d['synth_size']}x{d['synth_size']}, left camera). Training uses the five training
instances of each class, testing the five unseen ones, as in smallNORB. Preprocessing as in the paper:
per-image standardisation, random {d['crop']}x{d['crop']} crops with random brightness and contrast for
training, the centre crop for testing.

## Results

{_table(report['results'])}

Chance is 80% error. These are short CPU runs, far from the paper's figures (smallNORB test error 2.2% for
the small capsule network, 5.2% for the CNN after many hours of training).

![test error](test-error.png)

![training error](train-error.png)

| capsules | CNN |
| --- | --- |
| ![capsules confusion](confusion-capsules.png) | ![CNN confusion](confusion-cnn.png) |

## The data (test split: unseen instances, one row per class)

![data](data.png)

## Settings

Common: `{' '.join(DATA['quick' if report['quick'] else 'full'] + COMMON)}`
{settings}

Capsule routing: {routing}.
Each run directory under `runs/` holds its config, checkpoint and log; `emcaps eval runs/capsules`
re-evaluates one (add `--multi-crop` for the 13-crop test).
"""
