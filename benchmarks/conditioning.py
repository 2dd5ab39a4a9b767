"""How well-conditioned the routing is: how far float32 and bf16 autocast move a network's class activations
from a float64 copy of it, for each preset, parameterisation and seed, at initialisation and after a few
optimiser steps (or for a trained run).

    python benchmarks/conditioning.py                                  # every preset and parameterisation
    python benchmarks/conditioning.py --presets paper --seeds 0,1,2 --steps 0,20
    python benchmarks/conditioning.py --run runs/convergence/converge  # a trained checkpoint, its test images
    python benchmarks/conditioning.py --set conv_transform_std=1.0     # a model field changed
    python benchmarks/conditioning.py --parameterisations emcaps --routing var_floor=5e-4   # a routing field
    python benchmarks/conditioning.py --class-routing float32      # the class capsules routed in float32

The routed layers run on the PyTorch-ops path (`backend=torch`), the path a GPU runs; bf16 autocasts the
convolutions, and the capsule layers route in float32 as they always do, the class capsules in float64
(`--class-routing float32` routes them in float32 too: what that loses). 'spread' is the mean over images of
the std of the class activations over classes (0: every class alike, a dead start). A network whose error
is of rounding's size (1e-6 in float32) is well-conditioned; one whose routing divides by differences that
rounding erases moves by orders of magnitude more.
"""

from __future__ import annotations

import argparse
import json

import torch

from emcaps.diagnostics import precision_error
from emcaps.layers import ClassCaps
from emcaps.losses import spread_loss
from emcaps.models import create_model
from emcaps.routing import PARAMETERISATIONS, RoutingConfig, Runtime


def trained_steps(model: torch.nn.Module, steps: int, seed: int, batch: int = 16, lr: float = 1e-2) -> None:
    """`steps` Adam steps of the spread loss (margin 0.2) on random images (batch, 1, 32, 32) and labels."""
    if steps == 0:
        return
    gen = torch.Generator().manual_seed(seed + 1000)
    x = torch.randn(batch, 1, 32, 32, generator=gen)
    y = torch.randint(0, 5, (batch,), generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        spread_loss(model(x), y, 0.2).backward()
        opt.step()
    model.eval()


def measure(preset: str, parameterisation: str, seed: int, steps: int, images: int,
            fields: dict, routing: dict) -> dict:
    torch.manual_seed(seed)
    model = create_model(preset, routing=RoutingConfig.named(parameterisation, **routing),
                         runtime=Runtime(backend="torch"), **fields)
    trained_steps(model, steps, seed)
    x = torch.randn(images, 1, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        spread = float(model.eval()(x).std(1).mean())
    return {"preset": preset, "parameterisation": parameterisation, "seed": seed, "steps": steps,
            "float32": precision_error(model, x, "float32"), "bf16": precision_error(model, x, "bf16"),
            "spread": spread}


def measure_run(run: str, images: int) -> dict:
    from dataclasses import replace

    from emcaps.data.splits import load_split
    from emcaps.data.transforms import center_crop
    from emcaps.training.checkpoint import model_from_checkpoint

    model, config, state = model_from_checkpoint(run)
    model.set_runtime(Runtime(backend="torch"))
    data = load_split(replace(config.data, test_limit=images), "test")
    x = center_crop(data.images, config.data.crop)
    with torch.no_grad():
        spread = float(model.eval()(x).std(1).mean())
    return {"run": run, "step": int(state["step"]), "float32": precision_error(model, x, "float32"),
            "bf16": precision_error(model, x, "bf16"), "spread": spread}


def parse_fields(items: list[str]) -> dict:
    fields = {}
    for item in items:
        key, _, value = item.partition("=")
        fields[key] = json.loads(value)
    return fields


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="paper,small,tiny")
    p.add_argument("--parameterisations", default=",".join(PARAMETERISATIONS))
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", default="0", help="comma-separated optimiser steps before measuring")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="a CapsNetConfig field of every model (repeatable)")
    p.add_argument("--routing", action="append", default=[], metavar="FIELD=JSON",
                   help="a RoutingConfig field changed from the named parameterisation (repeatable)")
    p.add_argument("--run", action="append", default=[], help="a trained run directory or checkpoint")
    p.add_argument("--class-routing", choices=("float64", "float32"), default="float64",
                   help="the precision the class capsules route in, at least (float64, as emcaps does)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ClassCaps.route_dtype = getattr(torch, args.class_routing)
    fields = parse_fields(args.set)
    rows = [measure_run(run, args.images) for run in args.run]
    if not args.run:
        routing = parse_fields(args.routing)
        rows = [measure(preset, name, int(seed), int(steps), args.images, fields, routing)
                for preset in args.presets.split(",") for name in args.parameterisations.split(",")
                for seed in args.seeds.split(",") for steps in args.steps.split(",")]
    if args.json:
        print(json.dumps(rows))
        return
    keys = [k for k in rows[0] if k not in ("float32", "bf16", "spread")]
    print(" | ".join(keys + ["float32", "bf16 autocast", "spread"]))
    for row in rows:
        print(" | ".join([str(row[k]) for k in keys] +
                         [f"{row['float32']:.1e}", f"{row['bf16']:.1e}", f"{row['spread']:.3f}"]))
    print(f"worst: float32 {max(r['float32'] for r in rows):.1e} (target 1e-4), "
          f"bf16 {max(r['bf16'] for r in rows):.1e} (target 5e-2)")


if __name__ == "__main__":
    main()
