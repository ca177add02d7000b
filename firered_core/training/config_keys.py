"""Every training config key with its type, range and default, read from the config dataclasses themselves.

``docs/training.md`` holds the table :func:`markdown_table` makes (``python -m firered_core.training.config_keys``
prints it; ``--write`` puts it between the page's markers), and ``tests/test_docs.py`` fails when the page and the
classes disagree, so a key added to a config class without its row (or a changed range) is caught.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import types
import typing
from dataclasses import dataclass

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen, MultipleOf

from .. import doc_tables

BEGIN, END = "<!-- config-keys:begin (generated: python -m firered_core.training.config_keys --write) -->", \
    "<!-- config-keys:end -->"
HIDDEN: set[str] = set()  # keys left out of the table (none: test hooks are not config keys)


@dataclass(frozen=True)
class KeyRow:
    key: str
    type: str
    range: str
    default: str
    note: str


def _comments(cls) -> dict[str, str]:
    """The trailing ``# ...`` comment of each field line in the class's source (the field's one-line note)."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out = {}
    for line in lines:
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _num(x) -> str:
    """A bound as written in a config: integers exactly (2^64-1 included), other numbers shortest."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _bounds(metadata) -> str:
    lo = hi = mult = ""
    for m in metadata:
        for item in getattr(m, "metadata", [m]):  # a pydantic FieldInfo carries annotated_types constraints
            if isinstance(item, Ge):
                lo = f">= {_num(item.ge)}"
            elif isinstance(item, Gt):
                lo = f"> {_num(item.gt)}"
            elif isinstance(item, Le):
                hi = f"<= {_num(item.le)}"
            elif isinstance(item, Lt):
                hi = f"< {_num(item.lt)}"
            elif isinstance(item, MultipleOf):
                mult = f"multiple of {_num(item.multiple_of)}"
            elif isinstance(item, MinLen):
                lo = f"length >= {item.min_length}"
            elif isinstance(item, MaxLen):
                hi = f"length <= {item.max_length}"
    return ", ".join(p for p in (lo, hi, mult) if p)


def describe(tp) -> tuple[str, str]:
    """``(type, range)`` of one annotation, in the words the config file uses (null, list, one of ...)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        name, rng = describe(args[0])
        extra = _bounds(args[1:])
        return name, ", ".join(p for p in (rng, extra) if p)
    if origin is typing.Literal:
        return "choice", " / ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [describe(a) for a in args if a is not type(None)]
        name = " or ".join(p[0] for p in parts) + (" or null" if type(None) in args else "")
        return name, "; ".join(p[1] for p in parts if p[1])
    if origin in (list, tuple, dict):
        inner = [describe(a) for a in args if a is not Ellipsis]
        names = ", ".join(i[0] for i in inner)
        rng = "; ".join(dict.fromkeys(i[1] for i in inner if i[1]))
        kind = {list: "list", tuple: "pair" if len(args) == 2 else "tuple", dict: "map"}[origin]
        return f"{kind} of {names}" if origin is not dict else f"map {names.replace(', ', ' -> ')}", rng
    return getattr(tp, "__name__", str(tp)), ""


def _default(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if value is dataclasses.MISSING:
        return "(required)"
    if isinstance(value, tuple):
        value = list(value)
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def rows(cls=None, prefix: str = "") -> list[KeyRow]:
    """One row per leaf key of ``cls`` (default :class:`~firered_core.training.config.TrainConfig`), sections
    flattened with dots (``lora.rank``), in declaration order."""
    if cls is None:
        from .config import TrainConfig as cls
    hints = typing.get_type_hints(cls, include_extras=True)
    notes = _comments(cls)
    out: list[KeyRow] = []
    for f in dataclasses.fields(cls):
        if f.name in HIDDEN:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += rows(tp, f"{prefix}{f.name}.")
            continue
        name, rng = describe(tp)
        out.append(KeyRow(prefix + f.name, name, rng, _default(f), notes.get(f.name, "")))
    return out


def markdown_table() -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| key | type | range | default | note |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| `{r.key}` | {cell(r.type)} | {cell(r.range)} | `{cell(r.default)}` | {cell(r.note)} |"
              for r in rows()]
    return "\n".join(lines)


def replace_between_markers(text: str, table: str) -> str:
    """``text`` with what lies between :data:`BEGIN` and :data:`END` replaced by ``table``."""
    return doc_tables.replace_between_markers(text, table, BEGIN, END)


def main(argv: list[str] | None = None) -> None:
    doc_tables.main("training.md", markdown_table(), BEGIN, END, argv)


if __name__ == "__main__":
    main()
