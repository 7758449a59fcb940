"""The config reference, generated from the dataclasses' field docstrings (never hand-written,
so it cannot drift from the code). ``python -m engine config --reference`` prints it; the
README embeds it and a test checks the two agree."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Dict, List, Optional

from engine import config as config_module


def field_docs(cls) -> Dict[str, str]:
    """Map field name -> the string literal written right after it in the class body."""
    node = ast.parse(inspect.getsource(cls)).body[0]
    if not isinstance(node, ast.ClassDef):
        raise TypeError(f"{cls!r} is not a class")
    body: List[Optional[ast.stmt]] = list(node.body)
    docs = {}
    for stmt, nxt in zip(body, body[1:] + [None]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[stmt.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Literal:  # the choices are shown in the range column
        return type(typing.get_args(tp)[0]).__name__
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list and args and typing.get_origin(args[0]) is typing.Literal:
        return f"List[{_type_name(args[0])}]"
    text = str(tp).replace("typing.", "").replace("engine.config.", "")
    return text if not isinstance(tp, type) else tp.__name__


def _is_list(tp) -> bool:
    return typing.get_origin(tp) is list or any(typing.get_origin(a) is list for a in typing.get_args(tp))


def _allowed(hint, ranged) -> str:
    """The range column: a Literal's choices, or a numeric Range (for a list, of each element)."""
    choices = config_module.field_choices(ranged)
    if choices is not None:
        return "one of " + ", ".join(f"`{c}`" for c in choices)
    rng = config_module.field_range(ranged)
    return "" if rng is None else f"each {rng}" if _is_list(hint) else str(rng)


def _optional_section(tp):
    """The dataclass of an ``Optional[Section]`` field (off by default, e.g. ``finetune.lora``), or None."""
    inner = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
        return inner[0]
    return None


def _section(lines: List[str], key: str, section) -> None:
    """Append the table of one section, then those of its sub-sections (``objective.dpo``,
    and the defaults of an optional one such as ``finetune.lora`` when it is set)."""
    cls = type(section)
    doc = inspect.getdoc(cls)
    if doc is None:
        raise ValueError(f"config section {cls.__name__} has no docstring for the reference")
    lines.append(f"### `{key}` — {' '.join(doc.split())}")
    lines.append("")
    lines.append("| key | type | range | default | meaning |")
    lines.append("| --- | --- | --- | --- | --- |")
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    ranged = typing.get_type_hints(cls, include_extras=True)
    nested = []
    for sub in dataclasses.fields(cls):
        default = getattr(section, sub.name)
        if dataclasses.is_dataclass(default):
            nested.append((f"{key}.{sub.name}", default))
            continue
        optional = _optional_section(hints[sub.name])
        if optional is not None:
            nested.append((f"{key}.{sub.name}", optional()))
        lines.append(
            f"| `{key}.{sub.name}` | `{_type_name(hints[sub.name])}` | "
            f"{_allowed(hints[sub.name], ranged[sub.name])} | `{default!r}` | "
            f"{docs.get(sub.name, '').replace('|', '/')} |"
        )
    lines.append("")
    for sub_key, sub_section in nested:
        _section(lines, sub_key, sub_section)


def reference_markdown() -> str:
    """Markdown tables of every config section: key, type, allowed range or choices, default, meaning."""
    lines: List[str] = []
    root = config_module.Config()
    for f in dataclasses.fields(config_module.Config):
        _section(lines, f.name, getattr(root, f.name))
    return "\n".join(lines).rstrip() + "\n"


START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def embedded_reference(text: str) -> str:
    """The reference embedded in a Markdown text between the markers."""
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def update_readme(path: str) -> None:
    """Replace the reference between the markers of ``path`` with the current one."""
    p = Path(path)
    head, rest = p.read_text().split(START, 1)
    _, tail = rest.split(END, 1)
    p.write_text(head + START + "\n" + reference_markdown() + END + tail)
