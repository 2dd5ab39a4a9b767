"""Write docs/configs.md: every field of every config dataclass, its type, default and meaning, and the
configs shipped with emcaps.

    python docs/gen_config_reference.py          # rewrite docs/configs.md
    python docs/gen_config_reference.py --check  # exit 1 if docs/configs.md differs from what it would write

The meanings come from the code: first a field's entry in its class docstring (`name: text`, or
`a, b: text` for several fields; continuation lines are indented or carry no entry of their own), then the
comment on the field's line in the class body, then the sentences of the docstring that name the field
(`field` in backticks, or a name with an underscore as a word). What none of these describe is in
`EXTRA` below. tests/test_docs.py regenerates the page in memory and asserts the committed file equals it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "configs.md"

# Meanings of the fields that neither a docstring entry nor a comment in the code describes. (A table's row
# links to its section without being told.)
EXTRA: dict[str, dict[str, str]] = {
    "RunConfig": {
        "data": "where images come from and how they are preprocessed.",
        "model": "which network, and its initialisation.",
        "optim": "the optimiser and its learning-rate schedule.",
        "loss": "the loss and its margin schedule.",
        "train": "the training loop: length, batch, device, checkpoints, evaluation.",
    },
    "DataConfig": {
        "synth_size": "side in pixels of the SynthNORB images rendered into the cache (`emcaps data synth --size`).",
        "synth_subset": "which SynthNORB viewpoints and lightings to render: 'full' (smallNORB's 24,300 pairs "
                        "per split), 'small' or 'tiny' (subsets for quick runs).",
        "synth_seed": "seed of SynthNORB's object shapes: another seed renders other instances.",
        "augment": "train on random crops with random brightness and contrast (the paper); false: centre "
                   "crops only.",
    },
    "ModelConfig": {
        "coord_add": "coordinate addition in the class capsules: the scaled (row, column) of each child's "
                     "receptive field is added to its votes (the paper; false for the ablation).",
    },
    "OptimConfig": {
        "optimizer": "'adam', 'adamw' or 'sgd' (with `momentum`).",
        "weight_decay": "L2 weight decay (decoupled for 'adamw'); the paper's recipe uses 2e-7.",
        "momentum": "momentum of 'sgd'.",
        "lr_decay": "with lr_schedule 'exponential': the factor per `decay_steps` steps.",
        "decay_steps": "with lr_schedule 'exponential': the steps over which the lr falls by `lr_decay`.",
        "min_lr_ratio": "with lr_schedule 'cosine': the lr at the end of the run, as a fraction of `lr`.",
        "warmup_steps": "the lr rises linearly from 0 over this many steps (0 = off).",
    },
    "TrainConfig": {
        "batch_size": "images per optimiser step (over all processes under torchrun).",
        "seed": "seed of the initialisation and of the batch order; a resumed run continues its random "
                "streams exactly.",
        "eval_batch_size": "images per batch when testing.",
        "log_every": "write a 'step' event to log.jsonl every this many steps.",
    },
}

# The sections of a run config, in file order, and the classes they hold.
SECTIONS = ("data", "model", "routing", "runtime", "optim", "loss", "train")


def config_classes() -> list[tuple[str, type]]:
    """(section, class) for the top level, each section of a RunConfig and each table within a section."""
    from emcaps.config import RunConfig

    out: list[tuple[str, type]] = [("", RunConfig)]
    by_name = {f.name: f for f in dataclasses.fields(RunConfig)}
    for section in SECTIONS:
        cls = by_name[section].default_factory
        out.append((section, cls))
        out += [(f"{section}.{f.name}", f.default_factory) for f in dataclasses.fields(cls)
                if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)]
    return out


# ---------------------------------------------------------------------------------------------------------
# Reading meanings from the code

def _entry_names(text: str, fields: set[str]) -> list[str] | None:
    """The field names of a docstring entry head ('a, b'), or None when it is not one."""
    names = [n.strip() for n in text.split(",")]
    return names if names and all(n in fields for n in names) else None


_HEAD = re.compile(r"(?P<head>[A-Za-z_][A-Za-z0-9_]*(?:,\s*[A-Za-z_][A-Za-z0-9_]*)*):\s")


def docstring_entries(doc: str, fields: set[str]) -> tuple[dict[str, str], list[str], list[str]]:
    """{field: meaning} from a class docstring, the sentences before its first entry, and its other
    sentences (those before the first entry among them).

    An entry starts at the beginning of a line, or after '; ' or '. ' within one, with the field names and
    a colon. Lines indented deeper than an entry's first line continue it whatever they say; otherwise an
    entry ends at the next entry or at a sentence that starts with a capital letter."""
    lines = inspect.cleandoc(doc).splitlines()
    entries: dict[str, str] = {}
    loose: list[str] = []
    intro: list[str] = []
    current: list[str] | None = None      # names of the open entry
    indent = 0
    text: list[str] = []
    indented = False

    def close() -> None:
        nonlocal current, text
        if current is not None:
            body = " ".join(text)
            if not indented:
                body, rest = _first_sentences(body)
                loose.extend(_sentences(rest))
            body = body.strip().rstrip(";").strip()
            for name in current:
                entries.setdefault(name, body)
        elif text:
            sentences = _sentences(" ".join(text))
            loose.extend(sentences)
            if not entries:
                intro.extend(sentences)
        current, text = None, []

    for raw in lines:
        if not raw.strip():
            close()
            continue
        lead = len(raw) - len(raw.lstrip())
        line = raw.strip()
        if current is not None and lead > indent:
            text.append(line)
            indented = True
            continue
        pos = 0
        for match in _HEAD.finditer(line):
            start = match.start()
            if start and not re.search(r"[.;]\s$", line[:start]):
                continue
            names = _entry_names(match.group("head"), fields)
            if names is None:
                continue
            text.append(line[pos:start].strip())
            close()
            current, indent, indented = names, lead, False
            pos = match.end()
        text.append(line[pos:].strip())
    close()
    return entries, [s for s in intro if s], [s for s in loose if s]


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.)])\s+(?=[A-Z`])", text) if s.strip()]


def _first_sentences(text: str) -> tuple[str, str]:
    """An entry's text up to the first sentence that starts with a capital letter, and the rest."""
    match = re.search(r"(?<=\.)\s+(?=[A-Z])", text)
    return (text, "") if match is None else (text[:match.start()], text[match.end():])


def field_comments(cls: type) -> dict[str, str]:
    """{field: the comment on its line in the class body, with the comment lines that continue it}."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    tree = ast.parse(source)
    out: dict[str, str] = {}
    body = tree.body[0].body
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            row = node.end_lineno - 1
            parts = []
            comment = lines[row].partition("#")[2].strip() if "#" in lines[row] else ""
            if comment:
                parts.append(comment)
                column = lines[row].index("#")
                for following in lines[row + 1:]:       # comment lines aligned with it continue it
                    if following.strip().startswith("#") and following.index("#") == column:
                        parts.append(following.strip().lstrip("#").strip())
                    else:
                        break
            if parts:
                out[node.target.id] = " ".join(parts)
    return out


def meanings(cls: type) -> dict[str, str]:
    """Every field of `cls` with its meaning."""
    from emcaps.config import ModelConfig
    from emcaps.models import CapsuleOptions

    names = [f.name for f in dataclasses.fields(cls)]
    entries, _, loose = docstring_entries(cls.__doc__ or "", set(names))
    comments = field_comments(cls)
    if cls is ModelConfig:                      # its capsule fields are CapsuleOptions', commented there
        comments = {**field_comments(CapsuleOptions), **comments}
    out = {}
    for name in names:
        text = entries.get(name) or comments.get(name)
        if name in entries and entries[name].startswith("see ") and name in comments:
            # 'see emcaps.models.CapsuleOptions; ...': the comment there, then the rest of the entry
            rest = entries[name].partition(";")[2].strip()
            text = comments[name] + (f"; {rest}" if rest else "")
        if not text:
            pattern = rf"`{name}`" if "_" not in name else rf"\b{name}\b"
            named = [s for s in loose if re.search(pattern, s)]
            text = " ".join(named)
        if not text:
            text = EXTRA.get(cls.__name__, {}).get(name, "")
        out[name] = text
    return out


# ---------------------------------------------------------------------------------------------------------
# Writing the page

def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return "a table"
    if isinstance(value, bool):
        return f"`{'true' if value else 'false'}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value!r}`"


def _type(f: dataclasses.Field, hints: dict[str, Any]) -> str:
    kind = hints[f.name]
    return kind.__name__ if isinstance(kind, type) else str(kind)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _intro(cls: type) -> str:
    """What the section is: the class docstring's sentences before its first field entry, and the others
    that describe no field (those that do are in the table)."""
    names = [f.name for f in dataclasses.fields(cls)]
    entries, intro, loose = docstring_entries(cls.__doc__ or "", set(names))
    comments = field_comments(cls)
    used = set()
    for name in names:
        if name not in entries and name not in comments:
            pattern = rf"`{name}`" if "_" not in name else rf"\b{name}\b"
            used.update(s for s in loose if re.search(pattern, s))
    return " ".join(s for s in loose if s in intro or s not in used)


def shipped_configs() -> list[tuple[str, str, str]]:
    """(name, what its leading comment says, the sections and keys it sets) for emcaps/configs/*.toml."""
    from emcaps.config import _named_config_dir, named_configs, tomllib

    out = []
    for name in named_configs():
        path = _named_config_dir() / f"{name}.toml"
        text = path.read_text()
        comment = []
        for line in text.splitlines():
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("#").strip())
        data = tomllib.loads(text)
        keys = []
        for section, values in data.items():
            if isinstance(values, dict):
                keys.append(", ".join(f"`{section}.{k} = {_toml(v)}`" for k, v in values.items()))
        out.append((name, " ".join(comment), "; ".join(keys)))
    return out


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def render() -> str:
    """The whole page, as docs/configs.md holds it."""
    import typing

    out = [
        "# Configs reference",
        "",
        "<!-- Generated by docs/gen_config_reference.py from the code; do not edit by hand. "
        "tests/test_docs.py fails when this page and the code disagree. -->",
        "",
        "A run is one `RunConfig`: a TOML file with a section per table below (`[data]`, `[model]`, "
        "`[routing]`, `[runtime]`, `[optim]`, `[loss]`, `[train]`) and `name` at the top. Anything a file "
        "leaves out takes the default below. `emcaps train --config NAME|FILE --set section.key=value` "
        "changes any field; unknown keys and values of the wrong type or range are refused with a message "
        "naming the key. A run directory's `config.toml` holds every field, so `emcaps train --config "
        "RUN/config.toml` reruns it.",
        "",
        "## Shipped configs",
        "",
        "`--config NAME` accepts these files of `src/emcaps/configs/`, installed with the package. What is "
        "not listed keeps its default.",
        "",
        "| name | what it is | what it sets |",
        "| --- | --- | --- |",
    ]
    for name, comment, keys in shipped_configs():
        out.append(f"| `{name}` | {_cell(comment)} | {_cell(keys)} |")
    for section, cls in config_classes():
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        title = f"`[{section}]`: `{cls.__name__}`" if section else f"Top level: `{cls.__name__}`"
        anchor = section.replace(".", "-") or "top-level"
        where = f"{cls.__module__}.{cls.__qualname__}"
        out += ["", f"## {title} {{#{anchor}}}", "", f"`{where}`. {_intro(cls)}".rstrip(), ""]
        out += ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
        described = meanings(cls)
        for f in fields:
            key = f"{section}.{f.name}" if section else f.name
            meaning = described[f.name]
            if dataclasses.is_dataclass(hints[f.name]):
                meaning = f"{meaning.rstrip('.')}: [`[{key}]`](#{key.replace('.', '-')})."
            out.append(f"| `{key}` | {_type(f, hints)} | {_default(f)} | {_cell(meaning)} |")
    from emcaps.routing import PARAMETERISATIONS

    out += ["", "## What each routing parameterisation sets {#parameterisations}", "",
            "`routing.parameterisation = NAME` sets these routing fields (and the model's initialisation, "
            "its `init` in `emcaps.routing.PARAMETERISATIONS`) wherever the config does not set them itself. A "
            "config that names a parameterisation and gives one of these fields another value is refused; an "
            "override of one (`--set`) changes that field alone, and the label becomes `custom`.", ""]
    names = list(PARAMETERISATIONS)
    keys = list(dict.fromkeys(k for p in PARAMETERISATIONS.values() for k in p.routing))
    out += ["| field | " + " | ".join(f"`{n}`" for n in names) + " |",
            "| --- | " + " | ".join("---" for _ in names) + " |"]
    for key in keys:
        out.append(f"| `routing.{key}` | " + " | ".join(f"`{_toml(PARAMETERISATIONS[n].routing.get(key))}`"
                                                          for n in names) + " |")
    model_keys = list(dict.fromkeys(k for p in PARAMETERISATIONS.values() for k in p.init))
    for key in model_keys:
        out.append(f"| `model.{key}` | " + " | ".join(
            f"`{_toml(PARAMETERISATIONS[n].init[key])}`" if key in PARAMETERISATIONS[n].init else "default"
            for n in names) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configs.md is out of date")
    args = parser.parse_args(argv)
    page = render()
    if args.check:
        if PAGE.read_text() != page:
            print(f"{PAGE} is out of date: run python docs/gen_config_reference.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(page)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
