"""The offline metrics of a run, row by row, each family cached on disk by content.

Every row gets the pixel metrics (:mod:`.metrics`: size, shift, unedited-region PSNR / SSIM); rows of people tasks
whose source shows a face get face identity (:mod:`.faces_metric`); rows of text tasks whose instruction quotes a
text get text accuracy (:mod:`.text_metric`). A result is stored under a key made of the metric's name and settings
and the bytes of the pictures and instruction it read, so a rerun (or a report with more metrics switched on)
computes only what is new, and a changed picture is measured again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import FireRedError
from ..images import load_image
from .benches import BenchRow, output_path
from .metrics import mask_path, metrics_dict, sample_metrics


class MetricCache:
    """JSON results on disk (the chat cache's atomic files), keyed by SHA-256 of the metric's name and its inputs."""

    def __init__(self, folder: str | Path | None):
        from ..llm import ChatCache

        self.disk = ChatCache(folder) if folder else None
        self.computed = 0
        self.hits = 0

    def get(self, name: str, parts: list, compute: Callable[[], dict | None]) -> dict | None:
        digest = hashlib.sha256(name.encode())
        for part in parts:
            digest.update(b"\0" + (part if isinstance(part, bytes) else str(part).encode()))
        key = digest.hexdigest()
        text = self.disk.get(key) if self.disk is not None else None
        if text is not None:
            self.hits += 1
            return json.loads(text)
        value = compute()
        self.computed += 1
        if self.disk is not None:
            self.disk.put(key, json.dumps(value), name)
        return value


def _chosen(task: str, tasks: tuple[str, ...] | None) -> bool:
    """``tasks`` None = every task; else a task whose name contains one of them."""
    return tasks is None or any(t in task for t in tasks)


@dataclass
class Measures:
    """What to measure: ``face`` / ``text`` None = off; ``*_tasks`` None = every task."""

    threshold: float = 0.1
    masks: str | None = None
    face: object | None = None  # FaceIdentity
    face_tasks: tuple[str, ...] | None = None
    text: object | None = None  # TextAccuracy
    text_tasks: tuple[str, ...] | None = None
    notes: tuple[str, ...] = ()  # why a metric is off, said once with the summary


def measure_row(row: BenchRow, out: str | Path, m: Measures, cache: MetricCache) -> dict:
    """One record: ids, ``error`` (None when measured), the pixel metrics, and face / text metrics where they apply."""
    record = {"id": row.id, "task": row.task, "key": row.key, "error": None}
    output = output_path(out, row)
    if not output.is_file():
        record["error"] = f"no output image {output}"
        return record
    mask = mask_path(m.masks, row.key)
    try:
        src_bytes, out_bytes = Path(row.source).read_bytes(), output.read_bytes()
        mask_bytes = mask.read_bytes() if mask else b""
        source, edited = load_image(row.source), load_image(output)

        def pixels():
            return metrics_dict(sample_metrics(source, edited, load_image(mask) if mask else None, m.threshold))

        record.update(cache.get(f"pixels:{m.threshold}", [src_bytes, out_bytes, mask_bytes], pixels))
        if m.face is not None and _chosen(row.task, m.face_tasks):
            face = cache.get(m.face.name, [src_bytes, out_bytes], lambda: m.face(source, edited, row.key))
            record.update(face or {"face_identity": None, "face_box": "no face in the source"})
        if m.text is not None and _chosen(row.task, m.text_tasks):
            text = cache.get(m.text.name, [out_bytes, row.instruction], lambda: m.text(edited, row.instruction))
            if text is not None:
                record.update(text)
    except (FireRedError, OSError) as exc:  # an unreadable picture: counted as a failure, the rest goes on
        record["error"] = str(exc)
    return record


def measure_rows(rows: list[BenchRow], out: str | Path, m: Measures, cache: MetricCache,
                 progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    return [measure_row(row, out, m, cache) for row in tqdm(rows, desc="metrics", unit="img",
                                                            disable=None if progress else True)]
