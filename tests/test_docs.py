"""The documentation site: the generated configs page matches the code, every shipped config is on it, and
the changelog page includes CHANGELOG.md."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest

from emcaps.config import named_configs

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", DOCS / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen():
    return _generator()


def test_configs_page_is_generated_from_the_code(gen):
    committed = (DOCS / "configs.md").read_text()
    assert committed == gen.render(), "docs/configs.md is out of date: run python docs/gen_config_reference.py"


def test_every_shipped_config_is_on_the_page():
    page = (DOCS / "configs.md").read_text()
    shipped = named_configs()
    assert shipped, "no configs found in src/emcaps/configs"
    assert sorted(p.stem for p in (ROOT / "src" / "emcaps" / "configs").glob("*.toml")) == shipped
    for name in shipped:
        assert re.search(rf"^\| `{re.escape(name)}` \|", page, re.M), f"config {name!r} is not on docs/configs.md"


def test_every_field_has_a_default_and_a_meaning(gen):
    page = (DOCS / "configs.md").read_text()
    for section, cls in gen.config_classes():
        described = gen.meanings(cls)
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}" if section else f.name
            assert described[f.name].strip(), f"{key} has no meaning: document it in {cls.__name__} or EXTRA"
            assert re.search(rf"^\| `{re.escape(key)}` \| \w+ \| .+ \| .+ \|$", page, re.M), key


def test_docstring_entries_are_read():
    gen = _generator()
    doc = """What it is.

    alpha:  the first
            and its continuation. Still alpha.
    beta, gamma: shared; delta: inline. Loose sentence about `epsilon`.
    """
    entries, intro, loose = gen.docstring_entries(doc, {"alpha", "beta", "gamma", "delta", "epsilon"})
    assert entries["alpha"] == "the first and its continuation. Still alpha."
    assert entries["beta"] == entries["gamma"] == "shared"
    assert entries["delta"] == "inline."
    assert intro == ["What it is."]
    assert "Loose sentence about `epsilon`." in loose


def test_changelog_page_includes_the_changelog():
    page = (DOCS / "changelog.md").read_text()
    assert '--8<-- "CHANGELOG.md"' in page
    assert (ROOT / "CHANGELOG.md").is_file()


def test_every_stored_run_config_retrains_with_emcaps_train():
    """The docs say `emcaps train --config docs/results/.../NAME.toml` reruns a stored run: each must load as
    a --config file does (label and fields agreeing), and say whether its class capsules' floor annealed."""
    from emcaps import config

    files = sorted((DOCS / "results").rglob("*.toml"))
    assert len(files) > 40
    for path in files:
        text = path.read_text()
        loaded = config.load(path)
        assert "class_floor_start" in text or loaded.model.name == "cnn", path
