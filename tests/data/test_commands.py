import argparse
import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest

from emcaps.data.cache import default_data_dir
from emcaps.data.commands import add_data_parser
from emcaps.data.smallnorb import SMALLNORB_FILES, SPLIT_FILES, SmallNORB


def parse(argv):
    parser = argparse.ArgumentParser(prog="emcaps")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("EMCAPS_DATA_DIR", str(tmp_path / "d"))
    assert default_data_dir() == tmp_path / "d"
    monkeypatch.delenv("EMCAPS_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "emcaps"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_data_dir() == Path.home() / ".cache" / "emcaps"


def test_synth_then_show(tmp_path, capsys):
    args = parse(["data", "synth", "--out", str(tmp_path / "s"), "--size", "16", "--subset", "tiny", "--quiet"])
    assert args.func(args) == 0
    assert len(SmallNORB(tmp_path / "s", "train")) == 750
    args = parse(["data", "show", str(tmp_path / "s"), "--out", str(tmp_path / "m.png")])
    assert args.func(args) == 0
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def test_synth_into_cache(tmp_path):
    args = parse(["data", "synth", "--data-dir", str(tmp_path), "--size", "8", "--subset", "tiny", "--quiet"])
    assert args.func(args) == 0
    (made,) = tmp_path.iterdir()
    assert made.name.startswith("synthnorb-") and (made / "synthnorb.json").is_file()


def test_bad_arguments_rejected():
    with pytest.raises(SystemExit):
        parse(["data", "download", "imagenet"])
    with pytest.raises(SystemExit):
        parse(["data", "synth", "--subset", "huge"])


def test_smallnorb_file_table_names_match_the_reader():
    names = {f.name.removesuffix(".gz") for f in SMALLNORB_FILES}
    assert len(names) == 6 and all(n.startswith("smallnorb-5x") and n.endswith(".mat") for n in names)
    assert all(f.size and len(f.sha256) == 64 for f in SMALLNORB_FILES)


def test_download_command_against_local_server(tmp_path, monkeypatch):
    from emcaps.data import smallnorb
    from emcaps.data.download import RemoteFile
    from emcaps.data.synthnorb import render_dataset

    from .http_server import FileServer

    source = render_dataset(tmp_path / "src", size=8, subset="tiny", progress=False)

    blobs = {p.name + ".gz": gzip.compress(p.read_bytes()) for p in source.glob("*.mat")}
    table = tuple(RemoteFile(n, len(b), hashlib.sha256(b).hexdigest()) for n, b in sorted(blobs.items()))
    monkeypatch.setattr(smallnorb, "SMALLNORB_FILES", table)
    with FileServer(blobs) as server:
        args = parse(["data", "download", "smallnorb", "--data-dir", str(tmp_path / "norb"),
                      "--base-url", server.base_url, "--quiet"])
        assert args.func(args) == 0
    got = SmallNORB(tmp_path / "norb", "test")
    assert np.array_equal(got.images(), SmallNORB(source, "test").images())
    assert sorted(p.suffix for p in (tmp_path / "norb").iterdir()) == [".mat"] * 6


def _cli(capsys, *argv) -> tuple[int, str]:
    """Run the whole `emcaps` command; its exit status and the one stderr line a user error must give."""
    from emcaps import cli

    status = cli.main(list(argv))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("emcaps: error: "), lines
    return status, lines[0]


@pytest.mark.parametrize("dataset", ["mnist", "smallnorb"])
def test_offline_download_is_one_line(tmp_path, capsys, dataset):
    from .http_server import closed_port_url

    base = closed_port_url().removesuffix("file.bin")
    status, line = _cli(capsys, "data", "download", dataset, "--data-dir", str(tmp_path / dataset),
                        "--base-url", base, "--quiet")
    assert status == 1 and "could not connect" in line and "are you offline?" in line


def test_missing_and_corrupt_data_are_one_line(tmp_path, capsys):
    toy = ["--set", "data.dataset=mnist", "--set", "data.mnist_source=full", "--set", f"data.root={tmp_path}",
           "--run-dir", str(tmp_path / "run")]
    status, line = _cli(capsys, "train", *toy)
    assert status == 1 and "missing train-images-idx3-ubyte" in line
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(b"\x08\x00\x00\x01 not an idx file")
    status, line = _cli(capsys, "train", *toy)
    assert status == 1 and "not a valid idx file: bad magic number" in line
    norb = tmp_path / "norb"
    norb.mkdir()
    status, line = _cli(capsys, "data", "show", str(norb))
    assert status == 1 and "fetch smallNORB with `emcaps data download smallnorb`" in line
    for name in SPLIT_FILES["train"].values():
        (norb / name).write_bytes(b"\x00" * 64)
    status, line = _cli(capsys, "data", "show", str(norb))
    assert status == 1 and "not a valid NORB matrix file" in line
