"""Rows of the FireRed JSONL format as the data tools carry them, read and written in shards.

A row is a plain JSON-able dict: ``uid`` (``task/<file relative to its task folder>:<line>``), ``task``,
``sources`` and ``target`` (absolute image paths) and ``record`` (the original JSON object, every key kept).
Reading validates each row with the trainer's own :func:`firered_core.training.data.parse_row`, so a row that
survives here is a row the trainer accepts.

Between stages rows live in JSONL work files; every row the pipeline materialises from one comes through
:func:`load_row`, a shard (``shard_size`` lines, located by byte offsets) at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..training.data import parse_row, task_files
from .extras import DataToolError
from .files import atomic_open, json_line


def make_row(uid: str, task: str, sources: list[str], target: str, record: dict) -> dict:
    return {"uid": uid, "task": task, "sources": list(sources), "target": target, "record": dict(record)}


def iter_input(roots: str | Path | list) -> Iterator[tuple[dict | None, dict | None]]:
    """``(row, None)`` for each good row under ``roots`` (task folders of JSONL files, as the trainer reads them),
    ``(None, {"uid", "reason"})`` for each bad one (it appears in ``decisions.jsonl`` as dropped by stage "read")."""
    roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
    for root in roots:
        if not Path(root).exists():
            raise DataToolError(f"input {root} does not exist (expected a folder of task folders with *.jsonl)")
    found = False
    for root in map(Path, roots):
        for task, path in task_files(root):
            folder = path.parent if root.is_file() else (root if path.parent == root else root / task)
            rel = path.relative_to(folder).with_suffix("").as_posix()
            with open(path, encoding="utf-8") as fh:
                for line_no, text in enumerate(fh, start=1):
                    if not text.strip():
                        continue
                    found = True
                    uid = f"{task}/{rel}:{line_no}"
                    try:
                        record = json.loads(text)
                        sample = parse_row(record, path.parent, task, str(path), line_no)
                    except (ValueError, json.JSONDecodeError) as exc:
                        yield None, {"uid": uid, "reason": f"{path}:{line_no}: {exc}"}
                        continue
                    yield make_row(uid, task, [str(p.resolve()) for p in sample.sources],
                                   str(sample.target.resolve()), record), None
    if not found:
        raise DataToolError(f"no JSONL rows found under {[str(r) for r in roots]}")


def check_input(roots: str | Path | list) -> None:
    """Fail (DataToolError) unless every root exists and some JSONL file under them has a row: called before the
    output folder is touched, so a mistyped input leaves nothing behind that refuses the corrected command."""
    roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
    for root in roots:
        if not Path(root).exists():
            raise DataToolError(f"input {root} does not exist (expected a folder of task folders with *.jsonl)")
    for root in map(Path, roots):
        for _, path in task_files(root):
            with open(path, encoding="utf-8") as fh:
                if any(line.strip() for line in fh):
                    return
    raise DataToolError(f"no JSONL rows found under {[str(r) for r in roots]}")


def read_rows(roots: str | Path | list) -> tuple[list[dict], list[dict]]:
    """All rows under ``roots`` and the bad ones, in memory (small sets: evaluation, tests)."""
    rows, bad = [], []
    for row, b in iter_input(roots):
        (rows.append(row) if row is not None else bad.append(b))
    return rows, bad


def load_row(line: bytes | str) -> dict:
    """One work-file line as a row: the single place rows become Python objects (tests count them here)."""
    return json.loads(line)


@dataclass(frozen=True)
class Shards:
    """A JSONL work file cut into shards of ``size`` lines: ``bounds[i]:bounds[i+1]`` are shard i's bytes."""

    path: str
    bounds: tuple[int, ...]

    @classmethod
    def of(cls, path: Path, size: int) -> "Shards":
        bounds, pos, lines = [0], 0, 0
        with open(path, "rb") as fh:
            for line in fh:
                pos += len(line)
                lines += 1
                if lines % size == 0:
                    bounds.append(pos)
        if bounds[-1] != pos:
            bounds.append(pos)
        return cls(str(path), tuple(bounds))

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def raw(self, i: int) -> bytes:
        with open(self.path, "rb") as fh:
            fh.seek(self.bounds[i])
            return fh.read(self.bounds[i + 1] - self.bounds[i])

    def key(self, i: int) -> str:
        """Shard i's content hash: stored scores are reused only for the same rows."""
        return hashlib.sha256(self.raw(i)).hexdigest()[:24]

    def read(self, i: int) -> list[dict]:
        return read_range(self.path, self.bounds[i], self.bounds[i + 1])

    def __iter__(self) -> Iterator[list[dict]]:
        for i in range(len(self)):
            yield self.read(i)


def read_range(path: str, start: int, end: int) -> list[dict]:
    with open(path, "rb") as fh:
        fh.seek(start)
        data = fh.read(end - start)
    return [load_row(line) for line in data.splitlines() if line.strip()]


class JsonlWriter:
    """Rows appended to a JSONL file that appears (atomically) only when the writer closes without error."""

    def __init__(self, path: Path):
        self.path, self.count = path, 0
        self._stack = ExitStack()
        self._fh = self._stack.enter_context(atomic_open(path))

    def write(self, records: Iterable[dict]) -> None:
        for r in records:
            self._fh.write(json_line(r))
            self.count += 1

    def append_file(self, path: Path) -> None:
        """Append another JSONL file's lines (streaming)."""
        with open(path, encoding="utf-8") as src:
            for line in src:
                self._fh.write(line)
                self.count += 1

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.__exit__(*exc)


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


def write_rows(shards: Iterable[list[dict]], root: Path, name: str = "data.jsonl") -> dict[str, int]:
    """Write rows as ``root/<task>/<name>`` (one folder per task, as the trainer reads), streaming shard by shard
    (one open file per task); return rows per task."""
    with ExitStack() as stack:
        writers: dict[str, JsonlWriter] = {}
        for rows in shards:
            for row in rows:
                task = row["task"]
                if task not in writers:
                    writers[task] = stack.enter_context(JsonlWriter(root / task / name))
                writers[task].write([output_record(row, root / task)])
        return {t: w.count for t, w in sorted(writers.items())}
