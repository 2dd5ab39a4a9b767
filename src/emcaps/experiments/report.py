"""`emcaps report RUN_DIR...`: one Markdown page (and a plain HTML twin) gathering the results.md tables and
PNG figures of experiment, evaluation or demo directories, with figure links made relative to the page."""

from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence
from pathlib import Path

from emcaps.config import ConfigError

PAGES = ("results.md", "report.md")
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def _section(run: Path, page_dir: Path) -> str:
    """One directory's Markdown: its results page (headings two levels down, image links rebased) and any
    PNG in it or its eval/ folder that the page does not show."""
    if not run.is_dir():
        raise NotADirectoryError(f"{run} is not a directory of results")
    text, shown = "", set()
    for name in PAGES:
        if (run / name).is_file():
            text = (run / name).read_text()
            break

    def rebase(match: re.Match) -> str:
        target = match.group(2)
        if re.match(r"^[a-z]+://", target) or os.path.isabs(target):
            return match.group(0)
        shown.add((run / target).resolve())
        return f"![{match.group(1)}]({Path(os.path.relpath(run / target, page_dir)).as_posix()})"

    body = _IMAGE.sub(rebase, re.sub(r"^(#+) ", r"##\1 ", text, flags=re.MULTILINE)).strip()
    pngs = sorted(run.glob("*.png")) + sorted(run.glob("eval/*.png"))
    extra = [p for p in pngs if p.resolve() not in shown]
    if not body and not extra:
        raise FileNotFoundError(f"{run} holds no results.md, report.md or PNG figures")
    parts = [f"## {run.name}", "", f"`{Path(os.path.relpath(run, page_dir)).as_posix()}`", ""]
    if body:
        parts += [body, ""]
    parts += [f"![{p.stem}]({Path(os.path.relpath(p, page_dir)).as_posix()})\n" for p in extra]
    return "\n".join(parts)


def to_html(markdown: str, title: str = "emcaps report") -> str:
    """The small Markdown subset the experiments write: headings, tables, images, paragraphs."""
    out, table = [], []

    def inline(text: str) -> str:
        text = html.escape(text)
        text = _IMAGE.sub(lambda m: f'<img alt="{m.group(1)}" src="{m.group(2)}">', text)
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)

    def flush() -> None:
        if table:
            rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table
                    if not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line.strip())]
            out.append("<table>" + "".join(
                "<tr>" + "".join(f"<{t}>{inline(c)}</{t}>" for c in row) + "</tr>"
                for row, t in zip(rows, ["th"] + ["td"] * len(rows))) + "</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        heading = re.match(r"^(#{1,6}) (.*)", line)
        if heading:
            level = len(heading.group(1))
            out.append(f"<h{level}>{inline(heading.group(2))}</h{level}>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush()
    style = "body{font-family:sans-serif;max-width:60em;margin:auto}table{border-collapse:collapse}" \
            "td,th{border:1px solid #aaa;padding:2px 8px}img{max-width:100%}"
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


def write_report(run_dirs: Sequence[str | Path], out: str | Path = "report.md") -> dict[str, Path]:
    """Write the Markdown page `out` and its HTML twin (same name, .html); returns both paths."""
    if not run_dirs:
        raise ConfigError("give at least one run directory")
    out = Path(out)
    if out.suffix != ".md":
        raise ConfigError(f"the report must be a .md file, got {str(out)!r}")
    page_dir = out.resolve().parent
    sections = [_section(Path(d).resolve(), page_dir) for d in run_dirs]
    markdown = "\n".join(["# emcaps report", "", *sections])
    page_dir.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown.rstrip() + "\n")
    html_path = out.with_suffix(".html")
    html_path.write_text(to_html(markdown))
    return {"markdown": out, "html": html_path}
