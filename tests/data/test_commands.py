import argparse
import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest

from emcaps.data.cache import default_data_dir
from emcaps.data.commands import add_data_parser
from emcaps.data.smallnorb import SMALLNORB_FILES, SmallNORB


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
