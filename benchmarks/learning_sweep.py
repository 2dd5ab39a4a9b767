"""How fast the capsule network learns under different routing settings: a short training run per variant
on the viewpoint experiment's data (SynthNORB small subset, familiar azimuths), printing the error on the
familiar-azimuth test images every few steps.

    python benchmarks/learning_sweep.py --steps 450 \
        --variant '{}' --variant '{"normalise_cost": true, "final_lambda": 1.0}' --variant '{"lr": 3e-3}'

A variant is JSON: RoutingConfig fields, plus 'lr' (Adam, default 1e-2), 'schedule' ('constant' or
'cosine'), 'loss' (spread / margin /
cross_entropy), 'conv_std' and 'class_std' (initial std of the ConvCaps and class capsule transforms).
'parameterisation' names one of emcaps.routing.PARAMETERISATIONS ('emcaps', 'paper', 'authors', 'ibm'): its
routing fields and its initialisation (its `init`), which the variant's other keys override:

    python benchmarks/learning_sweep.py --threads 1 --steps 300 --every 150 \
        --variant '{"parameterisation": "authors"}' --variant '{"parameterisation": "ibm"}'

Not a timing benchmark: it measures how far each setting gets in a fixed number of steps. It also prints
each layer's activations and gradient norms at initialisation (`--steps 0`: those and the untrained network's error).
Each variant trains with the loop of `emcaps train` in OUT/runs/variantK, its RunConfig in OUT/variantK.toml.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from emcaps import config as cfgmod
from emcaps.data.splits import eval_batches
from emcaps.data.transforms import center_crop
from emcaps.diagnostics import gradient_norms
from emcaps.evaluate import error_rate, predict
from emcaps.experiments import common
from emcaps.experiments.viewpoint import familiar_mask
from emcaps.routing import DEFAULT_PARAMETERISATION, PARAMETERISATIONS
from emcaps.training.build import build_model


@torch.no_grad()
def activation_stats(model, images) -> dict[str, tuple[float, float]]:
    """Mean and standard deviation of each capsule layer's activations on images (N, C, 32, 32): how far
    from 'half active, half inactive' (Hinton's advice for the initialisation) a network starts."""
    seen, hooks = {}, []
    for name in ("primary", "conv_caps1", "conv_caps2", "class_caps"):
        hooks.append(getattr(model, name).register_forward_hook(
            lambda module, inputs, out, name=name: seen.__setitem__(name, out.activation)))
    was_training = model.training
    model.eval()
    model(images)
    model.train(was_training)
    for h in hooks:
        h.remove()
    return {name: (float(a.mean()), float(a.std())) for name, a in seen.items()}


def run(variant: dict, data, train, test, familiar, steps: int, every: int, model_name: str, seed: int,
        out: Path, role: str) -> dict:
    v = dict(variant)
    lr, loss, schedule = v.pop("lr", 1e-2), v.pop("loss", None), v.pop("schedule", "constant")
    name = v.pop("parameterisation", DEFAULT_PARAMETERISATION)
    init = dict(PARAMETERISATIONS[name].init)
    stds = {"conv_transform_std": v.pop("conv_std", None), "class_transform_std": v.pop("class_std", None),
            "transform_gain": v.pop("gain", None)}
    init.update({k: x for k, x in stds.items() if x is not None})
    routing = PARAMETERISATIONS[name].config(**v)
    config = common.run_config("sweep", role, data, model_name, common.Budget(steps, 32, lr, schedule), seed,
                               routing=routing, loss=loss or "auto")
    config = cfgmod.with_updates(config, model=init)
    torch.manual_seed(seed)                          # the loop's initial weights
    model = build_model(config, train.classes, train.images.shape[1])
    initial = activation_stats(model, center_crop(test.images[:32], 32))
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:32]
    gradients = gradient_norms(model, center_crop(train.images[pick], 32), train.labels[pick])
    history = []

    def check(m, step) -> bool:
        predicted = predict(m, eval_batches(test, 64, 32))[0].argmax(1)
        history.append((step, error_rate(predicted, test.labels, familiar)))
        return False

    started = time.perf_counter()
    final_loss = float("nan")
    if steps:
        model, fitted = common.fit(config, out, role, check_every=every, check=check)
        final_loss = fitted["final_loss"]
    check(model, steps)
    return {"variant": variant, "initial_activations": initial, "initial_gradients": gradients,
            "history": history, "final_loss": final_loss, "seconds": time.perf_counter() - started}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", action="append", default=[], help="JSON object (repeatable; default '{}')")
    p.add_argument("--steps", type=int, default=450)
    p.add_argument("--every", type=int, default=150, help="test every N steps")
    p.add_argument("--model", default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON line per variant")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="runs/learning-sweep", help="where the runs and their configs go")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = common.data_config("synthnorb", "", False, train_azimuths="familiar")
    train, test = common.load(cfg, "train"), common.load(cfg, "test")
    familiar = familiar_mask("azimuth", test.meta)
    for k, text in enumerate(args.variant or ["{}"]):
        result = run(json.loads(text), cfg, train, test, familiar, args.steps, args.every, args.model,
                     args.seed, Path(args.out), f"variant{k}")
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            errors = ", ".join(f"{s}: {100 * e:.1f}%" for s, e in result["history"])
            start = ", ".join(f"{k} {m:.3f} +- {sd:.3f}"
                              for k, (m, sd) in result["initial_activations"].items())
            grads = ", ".join(f"{k} {g:.2e}" for k, g in result["initial_gradients"].items())
            print(f"{text}: activations at initialisation (mean +- sd): {start}")
            print(f"{text}: gradient norms at initialisation: {grads}")
            print(f"{text:60s} familiar-azimuth test error at step {errors}; final loss "
                  f"{result['final_loss']:.3f}; {result['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
