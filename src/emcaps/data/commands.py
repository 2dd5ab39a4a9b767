"""The ``emcaps data`` subcommands (synth, show, download): thin wrappers over the data functions.

The main CLI owns the top-level parser and calls ``add_data_parser(subparsers)``; each leaf sets
``func(args) -> int``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from emcaps.data.cache import default_data_dir


def _synth(args: argparse.Namespace) -> int:
    from emcaps.data.synthnorb import ensure_synthnorb, render_dataset

    if args.out is None:
        path = ensure_synthnorb(size=args.size, seed=args.seed, subset=args.subset, data_dir=args.data_dir,
                                progress=not args.quiet)
    else:
        path = render_dataset(args.out, size=args.size, seed=args.seed, subset=args.subset, progress=not args.quiet)
    print(path)
    return 0


def _show(args: argparse.Namespace) -> int:
    from emcaps.data.synthnorb import show

    out = args.out if args.out is not None else Path(args.dir) / "montage.png"
    print(show(args.dir, out, split=args.split))
    return 0


def _download(args: argparse.Namespace) -> int:
    from emcaps.data import mnist, smallnorb

    module = {"smallnorb": smallnorb, "mnist": mnist}[args.dataset]
    target = Path(args.data_dir) if args.data_dir is not None else default_data_dir() / args.dataset
    kwargs = {"base_url": args.base_url} if args.base_url else {}
    print(module.download(target, progress=not args.quiet, **kwargs))
    return 0


def add_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``data`` with its ``synth``, ``show`` and ``download`` subcommands; returns the ``data`` parser."""
    from emcaps.data.synthnorb import SUBSETS

    data = subparsers.add_parser("data", help="render, inspect or download data sets",
                                 description=f"Data sets live under {default_data_dir()} unless told otherwise "
                                             "($EMCAPS_DATA_DIR overrides it).")
    commands = data.add_subparsers(dest="data_command", metavar="{synth,show,download}", required=True)

    synth = commands.add_parser("synth", help="render SynthNORB (smallNORB-format files)")
    synth.add_argument("--out", type=Path, help="directory to write (default: a cached one under --data-dir)")
    synth.add_argument("--data-dir", type=Path, help="cache root used when --out is not given")
    synth.add_argument("--size", type=int, default=96, help="image side in pixels (default 96)")
    synth.add_argument("--seed", type=int, default=0, help="seed of the object shapes (default 0)")
    synth.add_argument("--subset", choices=sorted(SUBSETS), default="full", help="viewpoints/lightings to render")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(func=_synth)

    show = commands.add_parser("show", help="montage PNG of a smallNORB-format directory")
    show.add_argument("dir", type=Path, help="directory holding the smallNORB files")
    show.add_argument("--out", type=Path, help="PNG to write (default: DIR/montage.png)")
    show.add_argument("--split", choices=("train", "test"), default="train")
    show.set_defaults(func=_show)

    download = commands.add_parser("download", help="download and verify smallNORB or MNIST")
    download.add_argument("dataset", choices=("smallnorb", "mnist"))
    download.add_argument("--data-dir", type=Path, help="where to put the files (default: cache dir/DATASET)")
    download.add_argument("--base-url", help="a mirror to fetch from instead of the official address")
    download.add_argument("--quiet", action="store_true", help="no progress bar")
    download.set_defaults(func=_download)
    return data
