"""The `emcaps` command: argument parsing only; every subcommand is a thin wrapper over a library function.

Errors a user can cause print one line, `emcaps: error: ...`, and exit non-zero (2 for usage and config
errors). Only the project's user-error types count (see `_user_errors`): any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from emcaps.checks import device_name

USAGE_ERROR = 2


class UsageError(Exception):
    """Bad arguments or config: exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr instead of the usage block."""

    def error(self, message: str):
        where = self.prog.removeprefix("emcaps").strip()
        raise UsageError(f"{where + ': ' if where else ''}{message} (see {self.prog} --help)")


# ---------------------------------------------------------------------------------------------------------
# Subcommands

def cmd_train(args: argparse.Namespace) -> int:
    from emcaps import config as cfgmod
    from emcaps.training import loop

    if args.resume:
        if args.config:
            raise UsageError("emcaps train: give either --config (a new run) or --resume RUN_DIR, not both")
        if args.run_dir:
            raise UsageError("emcaps train: --resume continues in its own directory; drop --run-dir")
        summary = loop.resume(args.resume, args.set, quiet=args.quiet)
    else:
        config = cfgmod.load(_config_path(args.config), args.set)
        run_dir = Path(args.run_dir) if args.run_dir else _shared_run_dir(config)
        summary = loop.train(config, run_dir, quiet=args.quiet)
    if _is_main_process():
        print(json.dumps(summary))
    return 0


def _is_main_process() -> bool:
    """False in every torchrun process but rank 0, which alone prints a run's summary."""
    return int(os.environ.get("RANK", "0")) == 0


def _config_path(name: str | None) -> Path | None:
    """A TOML file, or the name of a config shipped with emcaps (e.g. 'quick')."""
    if name is None:
        return None
    path = Path(name)
    if path.is_file():
        return path
    from emcaps.config import ConfigError, named_config_path, named_configs

    named = named_config_path(name) if path.suffix == "" and len(path.parts) == 1 else None
    if named is None:
        raise ConfigError(f"config file {name!r} does not exist (named configs: {', '.join(named_configs())})")
    return named


def _shared_run_dir(config) -> Path:
    """runs/NAME-TIMESTAMP; under torchrun, rank 0's choice is broadcast so all ranks agree."""
    from emcaps.training.distributed import setup_distributed
    from emcaps.training.loop import default_run_dir

    run_dir = default_run_dir(config)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        setup_distributed(config.train.device)
        box = [str(run_dir)]
        dist.broadcast_object_list(box, src=0)
        run_dir = Path(box[0])
    return run_dir


def cmd_eval(args: argparse.Namespace) -> int:
    from emcaps.evaluate import evaluate_run

    path, out, overrides = args.path, args.out, list(args.set)
    if (path is None) == (args.pretrained is None):
        raise UsageError("emcaps eval: give a checkpoint or run directory, or --pretrained NAME")
    if args.pretrained is not None:
        from emcaps.pretrained import weights_path

        path, out = weights_path(args.pretrained), out or f"eval-{args.pretrained}"
        if not any(text.split("=", 1)[0].strip() == "data.test_limit" for text in overrides):
            overrides.append("data.test_limit=0")    # the weights' own error is on the whole split
    result = evaluate_run(path, multi_crop=args.multi_crop, out_dir=out, device=args.device,
                          overrides=overrides, batch_size=args.batch_size, quiet=args.quiet)
    crops = f" ({result['crops']} crops)" if args.multi_crop else ""
    recon = (f", reconstruction error {result['reconstruction_mse']:.3f} per pixel"
             if "reconstruction_mse" in result else "")
    print(f"{result['name']}: test error {100 * result['test_error']:.2f}%{crops}{recon} on "
          f"{result['images']} images; results in {result['out_dir']}")
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from emcaps import config as cfgmod
    from emcaps.diagnostics import diagnose, format_report

    if (args.path is None) == (args.config is None):
        raise UsageError("emcaps diagnose: give a CHECKPOINT_OR_RUN_DIR or --config NAME (a fresh network)")
    config = cfgmod.load(_config_path(args.config), args.set) if args.config else None
    result = diagnose(args.path, config, images=args.images, device=args.device)
    if args.json:
        print(json.dumps(result))
        return 0
    where = f"step {result['step']}" if args.path else "initialisation"
    print(f"{result['name']} at {where}, {args.images} test images\n")
    print(format_report(result["layers"]))
    grads = ", ".join(f"{k} {v:.2e}" for k, v in result["gradients"].items())
    print(f"\ngradient norms of the spread loss (margin 0.2): {grads}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from emcaps.demo import run_demo

    run_demo(args.out, quick=args.quick, quiet=args.quiet, capsules=args.set)
    return 0


# ---------------------------------------------------------------------------------------------------------
# The parser

def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="emcaps", description="Matrix capsule networks with EM routing.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    p = sub.add_parser("train", help="train a model from a TOML config", description=(
        "Train a model. A run directory gets config.toml, checkpoint.pt (atomic, every epoch and every "
        "train.checkpoint_minutes) and log.jsonl. Under torchrun, every process trains on a shard."))
    p.add_argument("--config", metavar="FILE|NAME", help=f"TOML config file, or the name of one shipped with "
                   f"emcaps ({_named_configs_text()}); defaults for anything left out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--run-dir", metavar="DIR", help="where to write the run (default runs/NAME-TIMESTAMP)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar or epoch lines")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on its test split", description=(
        "Test error, confusion matrix and per-viewpoint error of a checkpoint (or run directory); writes "
        "results.json and PNG figures. --pretrained NAME tests weights shipped with emcaps instead."))
    p.add_argument("path", metavar="CHECKPOINT_OR_RUN_DIR", nargs="?")
    p.add_argument("--pretrained", metavar="NAME", help="weights shipped with emcaps (e.g. synthnorb), tested on "
                   "the whole test split unless --set data.test_limit=N")
    p.add_argument("--multi-crop", action="store_true", help="average scores over the authors' 13 test crops")
    p.add_argument("--out", metavar="DIR", help="output directory (default RUN_DIR/eval)")
    p.add_argument("--device", default="auto", type=device_name, help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--batch-size", type=_positive, metavar="N", help="evaluation batch size")
    p.add_argument("--set", action="append", default=[], metavar="data.KEY=VALUE",
                   help="change the test data, e.g. --set data.viewpoints.test_azimuths=novel (repeatable)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("diagnose", help="how a capsule network routes, layer by layer", description=(
        "Per capsule layer: activation mean and spread across types, pose and vote scale; per EM iteration: "
        "inverse temperature, logit range, fraction of variances at the floor and assignment entropy; and "
        "the gradient norm reaching each layer. For a checkpoint, or a fresh network from a config."))
    p.add_argument("path", nargs="?", metavar="CHECKPOINT_OR_RUN_DIR")
    p.add_argument("--config", metavar="FILE|NAME", help="diagnose a freshly initialised network of this config "
                   f"(a TOML file or {_named_configs_text()})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (with --config; repeatable)")
    p.add_argument("--images", type=int, default=32, metavar="N", help="test images to route (default 32)")
    p.add_argument("--device", default="auto", type=device_name, help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("demo", help="train capsules and a CNN on SynthNORB and write a report", description=(
        "Render SynthNORB (once, into the user cache), train the small capsule network and the baseline CNN "
        "for a few minutes, test both on unseen object instances and write a Markdown report with figures."))
    p.add_argument("--quick", action="store_true", help="tiny data and models: well under a minute")
    p.add_argument("--out", metavar="DIR", default="demo-report", help="report directory (default demo-report)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change the capsule network's run, e.g. --set routing.var_floor=5e-4 (repeatable)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    from emcaps.data.commands import add_data_parser
    from emcaps.experiments.commands import add_experiment_parser, add_report_parser

    add_data_parser(sub)
    add_experiment_parser(sub)
    add_report_parser(sub)
    return parser


def _positive(text: str) -> int:
    """A count of at least 1, checked while parsing (a negative batch size would fail deep in torch)."""
    if not (text.strip().isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _named_configs_text() -> str:
    from emcaps.config import named_configs

    return ", ".join(named_configs())


def _version() -> str:
    from emcaps import __version__

    return f"emcaps {__version__}"


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause: missing or unreadable files and data, a bad checkpoint, no network."""
    from emcaps.data import DownloadError, IdxFormatError, NorbFormatError
    from emcaps.training.checkpoint import CheckpointError
    from emcaps.training.divergence import TrainingDiverged

    return (CheckpointError, TrainingDiverged, DownloadError, IdxFormatError, NorbFormatError,
            FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `emcaps` console script and `python -m emcaps`; returns the exit status."""
    from emcaps.config import ConfigError

    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except (UsageError, ConfigError) as err:
        print(f"emcaps: error: {_one_line(err)}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("emcaps: interrupted (a run resumes from its last checkpoint with --resume RUN_DIR)", file=sys.stderr)
        return 130
    except _user_errors() as err:
        print(f"emcaps: error: {_one_line(err)}", file=sys.stderr)
        return 1


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if isinstance(err, OSError) and err.filename and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
