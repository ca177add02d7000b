"""Rows of the FireRed JSONL format as the data tools carry them, and the filtered output the trainer reads.

A row is a plain JSON-able dict: ``uid`` (``task/<file relative to its task folder>:<line>``), ``task``,
``sources`` and ``target`` (absolute image paths) and ``record`` (the original JSON object, every key kept).
Reading validates each row with the trainer's own :func:`firered_core.training.data.parse_row`, so a row that
survives here is a row the trainer accepts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..training.data import parse_row, task_files
from .extras import DataToolError
from .files import write_jsonl


def make_row(uid: str, task: str, sources: list[str], target: str, record: dict) -> dict:
    return {"uid": uid, "task": task, "sources": list(sources), "target": target, "record": dict(record)}


def read_rows(roots: str | Path | list) -> tuple[list[dict], list[dict]]:
    """All rows under ``roots`` (task folders of JSONL files, as the trainer reads them) and the bad ones.

    Bad rows come back as ``{"uid", "reason"}`` so they appear in ``decisions.jsonl`` as dropped by stage "read".
    """
    roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
    rows, bad = [], []
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise DataToolError(f"input {root} does not exist (expected a folder of task folders with *.jsonl)")
        for task, path in task_files(root):
            folder = path.parent if root.is_file() else (root if path.parent == root else root / task)
            rel = path.relative_to(folder).with_suffix("").as_posix()
            with open(path, encoding="utf-8") as fh:
                for line_no, text in enumerate(fh, start=1):
                    if not text.strip():
                        continue
                    uid = f"{task}/{rel}:{line_no}"
                    try:
                        record = json.loads(text)
                        sample = parse_row(record, path.parent, task, str(path), line_no)
                    except (ValueError, json.JSONDecodeError) as exc:
                        bad.append({"uid": uid, "reason": f"{path}:{line_no}: {exc}"})
                        continue
                    rows.append(make_row(uid, task, [str(p.resolve()) for p in sample.sources],
                                         str(sample.target.resolve()), record))
    if not rows and not bad:
        raise DataToolError(f"no JSONL rows found under {[str(r) for r in roots]}")
    return rows, bad


def row_images(row: dict) -> list[str]:
    return [*row["sources"], row["target"]]


def output_record(row: dict, folder: Path) -> dict:
    """The row's JSON object with image paths made relative to ``folder`` (where its JSONL is written)."""
    rec = {k: v for k, v in row["record"].items() if k != "edit_image"}
    rel = [os.path.relpath(p, folder) for p in row["sources"]]
    rec["source_image"] = None if not rel else (rel[0] if len(rel) == 1 and not isinstance(
        row["record"].get("source_image"), list) else rel)
    rec["target_image"] = os.path.relpath(row["target"], folder)
    return rec


def write_rows(rows: list[dict], root: Path, name: str = "data.jsonl") -> dict[str, int]:
    """Write rows as ``root/<task>/<name>`` (one folder per task, as the trainer reads); return rows per task."""
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    for task, items in sorted(by_task.items()):
        folder = root / task
        write_jsonl(folder / name, (output_record(r, folder) for r in items))
    return {t: len(v) for t, v in sorted(by_task.items())}
