"""Robustness to white-box adversarial attacks (the paper's section 5, Figure 3).

Both models are attacked on the same test images with FGSM and BIM: untargeted (accuracy vs eps) and
targeted at a random wrong class (success rate vs eps). Eps is in units of the standardised pixels the
models see (images have zero mean and unit variance), so eps 0.5 is half a standard deviation per pixel.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from emcaps import attacks, plots
from emcaps.config import ConfigError
from emcaps.data.transforms import center_crop
from emcaps.experiments import common
from emcaps.training.checkpoint import CheckpointError, model_from_checkpoint

ATTACK_EPS = (0.0, 0.05, 0.1, 0.25, 0.5)
FAST_ATTACK_EPS = (0.0, 0.5)
LABELS = {"cnn": "CNN", "capsules": "capsules"}
FLAGS = {"cnn": "cnn", "capsules": "capsnet"}                  # the command-line option of each checkpoint


def _loaded(capsnet: str, cnn: str, device) -> dict[str, dict[str, Any]]:
    """{'cnn': {...}, 'capsules': {...}} from checkpoints (of `emcaps train`), each with the model under
    'net', its training steps and the data shape it was built for; a wrong kind of model is an error."""
    out = {}
    for name, path, want in (("cnn", cnn, "logit"), ("capsules", capsnet, "activation")):
        try:
            model, _, state = model_from_checkpoint(path, device)
        except CheckpointError as err:                          # say which of the two files it was
            raise CheckpointError(f"--{FLAGS[name]}: {err}") from None
        if getattr(model, "score_kind", "logit") != want:
            raise CheckpointError(f"--{FLAGS[name]} {path}: the checkpoint holds the wrong kind of model "
                             f"({type(model).__name__})")
        shape = state.get("data_shape", {})
        out[name] = {**common.describe_model(model, type(model).__name__), "source": str(path),
                     "steps": state["step"], "classes": shape.get("classes", 5),
                     "in_channels": shape.get("in_channels", 1), "net": model}
    return out


def _check_fits(models: dict[str, dict[str, Any]], test) -> None:
    """Loaded models must have been trained on data like the test set (classes, channels)."""
    want = (test.classes, test.images.shape[1])
    for name, m in models.items():
        if (m["classes"], m["in_channels"]) != want:
            raise CheckpointError(f"--{FLAGS[name]} {m['source']}: the model was trained on {m['classes']} "
                             f"classes of {m['in_channels']}-channel images; this test set has {want[0]} "
                             f"classes of {want[1]}-channel images")


def _trained(data, cfg: dict[str, Any], seed: int, device: str, out: Path,
             quiet: bool) -> dict[str, dict[str, Any]]:
    """{'cnn': {...}, 'capsules': {...}} each trained here (budgets from `cfg`, configs and runs in
    `out`), the model under 'net'."""
    models = {}
    for name, arch in (("cnn", "cnn"), ("capsules", cfg["capsnet"])):
        routed = arch != "cnn"                              # the CNN's config keeps the default routing
        config = common.run_config("adversarial", name, data, arch, cfg[name], seed, device,
                                   routing=cfg["routing"] if routed else None,
                                   overrides=cfg["overrides"] if routed else ())
        model, fitted = common.fit(config, out, name, quiet=quiet)
        models[name] = {**common.describe_model(model, arch), **fitted, "source": "trained", "net": model}
    return models


def run_adversarial(out_dir: str | Path = "adversarial", fast: bool = False, dataset: str = "synthnorb",
                    root: str = "", seed: int = 0, capsnet: str | None = None, cnn: str | None = None,
                    eps: Sequence[float] | None = None, images: int | None = None,
                    bim_steps: int | None = None, quiet: bool = True, device: str = "cpu",
                    steps: int | None = None, capsnet_lr: float | None = None,
                    iterations: int | None = None, capsnet_steps: int | None = None,
                    routing: Sequence[str] = ()) -> dict[str, Any]:
    """Train (or load) both models, attack them, write results.json, results.md and four PNGs.
    `steps`, `capsnet_lr`, `iterations`, `capsnet_steps` and `routing` replace the defaults of
    `common.settings`."""
    eps = list(eps if eps is not None else (FAST_ATTACK_EPS if fast else ATTACK_EPS))
    images = images or (8 if fast else 500)
    bim_steps = bim_steps or (2 if fast else 10)
    cfg = common.settings(fast, steps, capsnet_lr, iterations, capsnet_steps, routing)
    if bool(capsnet) != bool(cnn):
        raise ConfigError("give both --capsnet CKPT and --cnn CKPT, or neither (to train both)")
    dev = common.device_of(device)
    loaded = _loaded(capsnet, cnn, dev) if capsnet and cnn else None     # before the data: fail fast
    data_cfg = common.data_config(dataset, root, fast)
    test = common.load(data_cfg, "test")
    if loaded is not None:
        _check_fits(loaded, test)
    out = Path(out_dir)
    models = loaded or _trained(data_cfg, cfg, seed, device, out, quiet)
    x, y = center_crop(test.images[:images], 32), test.labels[:images]
    say = (lambda text: None) if quiet else (lambda text: print(text, flush=True))
    methods = {"fgsm": attacks.fgsm, "bim": functools.partial(attacks.bim, steps=bim_steps)}
    curves: dict[str, dict[str, dict[str, list[float]]]] = {}
    for method, attack in methods.items():
        curves[method] = {"untargeted_accuracy": {}, "targeted_success": {}}
        for name, m in models.items():
            net = m["net"]
            curves[method]["untargeted_accuracy"][name] = attacks.accuracy_under_attack(
                net, (x, y), attack, eps)
            curves[method]["targeted_success"][name] = attacks.targeted_success_rate(
                net, (x, y), attack, eps, classes=test.classes, seed=seed)
            say(f"{method} {name}: accuracy {curves[method]['untargeted_accuracy'][name]}, "
                f"targeted success {curves[method]['targeted_success'][name]}")
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for method in methods:
        for kind, ylabel in (("untargeted_accuracy", "accuracy (%)"), ("targeted_success", "success rate (%)")):
            name = f"{method}-{kind.split('_')[0]}.png"
            plots.line_plot(out / name, {LABELS[k]: (eps, [100 * v for v in vals])
                                         for k, vals in curves[method][kind].items()},
                            title=f"{method.upper()}: {kind.replace('_', ' ')}",
                            xlabel="perturbation eps (max-norm, standardised pixel units)", ylabel=ylabel,
                            ylim=(0, 100))
            figures.append(name)
    for m in models.values():
        del m["net"]
    results = {"experiment": "adversarial", "dataset": dataset, "fast": fast, "seed": seed, "eps": eps,
               "attack_images": len(y), "bim_steps": bim_steps, "models": models, "curves": curves,
               "budgets": None if loaded else common.budgets(cfg),
               "figures": figures,
               "objective": {"cnn": "cross-entropy",
                             "capsules": f"spread loss, margin {attacks.ATTACK_MARGIN}"}}
    return common.write_results(out, results, _markdown(results))


def _markdown(r: dict[str, Any]) -> str:
    parts = ["# Adversarial robustness", "",
             f"{r['attack_images']} test images of {r['dataset']}; BIM takes {r['bim_steps']} steps; eps in "
             f"standardised pixel units{' (fast mode: a smoke test, not a result)' if r['fast'] else ''}. "
             f"Paper (smallNORB, eps 0.5 untargeted accuracy): FGSM CNN ~3% / capsules ~69%, BIM CNN ~5% / "
             f"capsules ~55%.", ""]
    m = r["models"]
    parts += ["Models: " + "; ".join(
        f"{LABELS[k]} ({m[k]['model']}, {m[k]['params']:,} params, "
        + (f"trained here for {m[k]['steps']} steps of batch {r['budgets'][k]['batch_size']}, Adam lr "
           f"{r['budgets'][k]['lr']:g}{common.routing_text(r['budgets'][k])})"
           if m[k].get("source") == "trained" and r.get("budgets") else f"from {m[k]['source']})")
        for k in ("cnn", "capsules")) + ".", ""]
    for method, c in r["curves"].items():
        header = ["model"] + [f"eps {e:g}" for e in r["eps"]]
        for kind, title in (("untargeted_accuracy", "untargeted accuracy"),
                            ("targeted_success", "targeted success rate")):
            parts += [f"## {method.upper()}: {title}", "",
                      common.markdown_table(header, [[LABELS[k]] + [common.pct(v) for v in vals]
                                                     for k, vals in c[kind].items()]), "",
                      f"![{method} {title}]({method}-{kind.split('_')[0]}.png)", ""]
    return "\n".join(parts)
