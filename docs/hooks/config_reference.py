"""MkDocs hook: the configuration reference, generated from `ft_ray/config.py` at every build.

A page that contains `<!-- config-reference -->` gets, in its place, one table per section of the
config tree (`Config` -> `model`, `data`, `optim`, `train`): every dataclass field with its type,
its default and the comment written beside it (or in the comment block just above it) in the
source. The tables are read from the code on each build, so they cannot drift from it.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import sys
import tokenize
import typing
from pathlib import Path

MARKER = "<!-- config-reference -->"
ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "ft_ray" / "config.py"


def _comments(source: str) -> dict[int, str]:
    """Line number -> the text of the comment on that line."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def field_docs(source: str) -> dict[str, dict[str, tuple[str, str, str]]]:
    """class name -> field name -> (annotation as written, comment, group), from the source text.

    A field's comment is the one on its line; a comment block right above a field without one is
    its comment too (a long explanation), while a block above a field that has its own comment
    names the group of fields that starts there (`# Free Transformer`)."""
    comments, lines = _comments(source), source.splitlines()
    out: dict[str, dict[str, tuple[str, str, str]]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = out.setdefault(node.name, {})
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above, line = [], stmt.lineno - 1  # a comment block right above the field
            while line >= 1 and lines[line - 1].strip().startswith("#"):
                above.insert(0, comments[line])
                line -= 1
            own = comments.get(stmt.lineno, "")
            text, group = (own, " ".join(above)) if own else (" ".join(above), "")
            fields[stmt.target.id] = (ast.get_source_segment(source, stmt.annotation) or "", text, group)
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        return "(section)"
    else:
        return "(required)"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int) and value >= 1 << 16:
        return f"`{value}` (2^{value.bit_length() - 1})" if value & (value - 1) == 0 else f"`{value}`"
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def reference_markdown() -> str:
    """The tables for every section of `Config`, in the order the root declares them."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from ft_ray import config

    docs = field_docs(SOURCE.read_text())
    hints = typing.get_type_hints(config.Config)
    parts = []
    for section in dataclasses.fields(config.Config):
        cls = hints[section.name]
        doc = (cls.__doc__ or "").strip()
        parts += [f"## `{section.name}`: `{cls.__name__}`", "", doc, "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            annotation, comment, group = docs[cls.__name__][f.name]
            if group:
                parts.append(f"| *{_cell(group)}* | | | |")
            parts.append(f"| `{section.name}.{f.name}` | `{_cell(annotation)}` | {_cell(_default(f))} "
                         f"| {_cell(comment)} |")
        parts.append("")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:  # MkDocs hook
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, reference_markdown())
