"""A griffe extension for the API reference (mkdocs.yml, docs/reference.md).

surge's docstrings are written as reStructuredText, which the reference
renders as Markdown. Three constructs would print as written, so they are
turned into their Markdown equivalents before rendering:

- roles (``:class:`App```, ``:meth:`stop <App.stop>```, ``:func:`~surge.id_for```)
  become the code span of what they name;
- option lists (a line starting with a ````name```` and its description,
  continuation lines indented) become definition lists;
- simple tables (columns under rules of ``=``) become Markdown tables;

a paragraph that runs into a bullet list gets the blank line Markdown needs
before it, and one ending in ``::`` (a literal block follows) ends in ``:``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

__all__ = ("RstDocstrings", "markdown_of")

_ROLE = re.compile(r":(?:class|meth|func|attr|data|exc|mod|obj):`(~?)([^`<]+?)\s*(?:<[^`>]+>)?`")
_TERM = re.compile(r"^``([^`]+)``(?:\s+(\S.*))?$")
_RULE = re.compile(r"^=+(?:\s+=+)+\s*$")


def _role(match: re.Match[str]) -> str:
    tilde, name = match.groups()
    # ~a.b.c shows as c, as Sphinx shows it
    return f"`{name.rsplit('.', 1)[-1] if tilde else name}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(lines: list[str]) -> list[str]:
    """A simple table (its rules included) as a Markdown table."""
    rules = [i for i, line in enumerate(lines) if _RULE.match(line)]
    starts = [m.start() for m in re.finditer(r"=+", lines[rules[0]])]
    header: list[str] | None = None
    rows: list[list[str]] = []
    for i, line in enumerate(lines):
        if i in rules:
            if len(rules) == 3 and i == rules[1]:
                header, rows = rows[0], []
            continue
        cells = [
            line[a : starts[n + 1] if n + 1 < len(starts) else None].strip()
            for n, a in enumerate(starts)
        ]
        if rows and not cells[0]:  # a continuation of the row above
            rows[-1] = [f"{old} {new}".strip() for old, new in zip(rows[-1], cells, strict=True)]
        else:
            rows.append(cells)
    out = ["| " + " | ".join(_cell(c) for c in (header or [""] * len(starts))) + " |"]
    out.append("|" + "---|" * len(starts))
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def _options(lines: list[str]) -> list[str]:
    """An option list as a definition list."""
    terms: list[tuple[str, list[str]]] = []
    for line in lines:
        match = _TERM.match(line)
        if match is not None:
            terms.append((match.group(1), [match.group(2) or ""]))
        else:
            terms[-1][1].append(line.strip())
    out: list[str] = []
    for term, text in terms:
        out += [f"`{term}`", ":   " + " ".join(t for t in text if t), ""]
    return out[:-1]


def _lists(lines: list[str]) -> list[str]:
    """A paragraph that runs into a bullet list, with the blank line
    Markdown needs before the list."""
    for i in range(1, len(lines)):
        if lines[i].startswith("- ") and not lines[i - 1].startswith(("- ", " ")):
            return [*lines[:i], "", *lines[i:]]
    return lines


def markdown_of(text: str) -> str:
    """``text`` (a docstring) with roles, option lists, simple tables and
    literal-block markers turned into Markdown."""
    text = _ROLE.sub(_role, text)
    out: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        rules = [line for line in lines if _RULE.match(line)]
        if len(rules) >= 2 and _RULE.match(lines[0]) and _RULE.match(lines[-1]):
            lines = _table(lines)
        elif (
            _TERM.match(lines[0])
            and sum(1 for line in lines if _TERM.match(line)) >= 2
            and all(_TERM.match(line) or line[:1].isspace() for line in lines)
        ):
            lines = _options(lines)
        else:
            lines = _lists(lines)
        last = lines[-1].rstrip()
        if last.endswith("::"):
            lines[-1] = "" if last.strip() == "::" else last[:-1]
        out.append("\n".join(lines))
    return "\n\n".join(out)


class RstDocstrings(griffe.Extension):
    """Rewrites each docstring with :func:`markdown_of` as it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_of(obj.docstring.value)
