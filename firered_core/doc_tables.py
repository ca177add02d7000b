"""Tables generated into hand-written docs pages: the lines between two HTML-comment markers are the table, so a
page keeps its prose and a test can check that the table is current (``replace_between_markers(page) == page``)."""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def replace_between_markers(text: str, table: str, begin: str, end: str) -> str:
    """``text`` with what lies between ``begin`` and ``end`` replaced by ``table``."""
    start, stop = text.index(begin) + len(begin), text.index(end)
    return text[:start] + "\n" + table + "\n" + text[stop:]


def main(page_name: str, table: str, begin: str, end: str, argv: list[str] | None = None) -> None:
    """Print ``table``; with ``--write``, put it into ``docs/<page_name>`` between the markers."""
    argv = sys.argv[1:] if argv is None else argv
    if "--write" in argv:
        page = DOCS / page_name
        page.write_text(replace_between_markers(page.read_text(), table, begin, end))
        print(f"wrote {page}")
    else:
        print(table)
