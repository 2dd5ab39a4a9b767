"""A griffe extension for the API pages: emcaps' docstrings list fields and shapes as aligned lines

    votes:        (N, I, J, D)  vote of child i for parent j
    activations:  (N, I)        child activations

and lists as `- item` lines right after a sentence. Markdown would run both into one paragraph; this
turns each into a Markdown list (the docstrings themselves stay plain text)."""

from __future__ import annotations

import re

import griffe

_ENTRY = re.compile(r"^(?P<indent>\s*)(?P<head>[A-Za-z_][\w.]*(?:,\s*[A-Za-z_][\w.]*)*):\s+(?P<text>\S.*)$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def markdown_lists(text: str) -> str:
    """`text` with aligned `name: meaning` lines as a bulleted list and a blank line before each list."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    fenced = False
    while i < len(lines):
        line = lines[i]
        if _FENCE.match(line):
            fenced = not fenced
        match = None if fenced else _ENTRY.match(line)
        if match and not line.startswith("    "):
            indent = len(match.group("indent"))
            item = [match.group("text").strip()]
            i += 1
            while i < len(lines) and lines[i].strip() and not _ENTRY.match(lines[i]) and \
                    len(lines[i]) - len(lines[i].lstrip()) > indent:
                item.append(lines[i].strip())
                i += 1
            if out and out[-1].strip() and not out[-1].lstrip().startswith("- "):
                out.append("")
            heads = ", ".join(f"`{h.strip()}`" for h in match.group("head").split(","))
            out.append(f"- {heads}: {' '.join(item)}")
            if i < len(lines) and lines[i].strip() and not _ENTRY.match(lines[i]):
                out.append("")
            continue
        if not fenced and line.lstrip().startswith("- ") and not line.startswith("    "):
            if out and out[-1].strip() and not out[-1].lstrip().startswith("- "):
                out.append("")
            dash = len(line) - len(line.lstrip())
            out.append(line)
            i += 1
            while i < len(lines) and lines[i].strip() and not lines[i].lstrip().startswith("- ") and \
                    len(lines[i]) - len(lines[i].lstrip()) > dash:
                out.append(lines[i])
                i += 1
            if i < len(lines) and lines[i].strip() and not lines[i].lstrip().startswith("- "):
                out.append("")                  # a sentence after the list is not part of its last item
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


class FieldLists(griffe.Extension):
    """Rewrite every docstring's field lines and lists as Markdown lists before mkdocstrings renders it."""

    def on_instance(self, *, node, obj, agent, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_lists(obj.docstring.value)
