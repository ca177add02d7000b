"""FireRed training data: JSONL rows in one folder per task, validated row by row.

A row is ``{"source_image": str | [str, ...] | null, "target_image" | "edit_image": str, "instruction": str,
"instruction_cn": str, "inverse_instruction"?: str, "inverse_instruction_cn"?: str, "rejected_image"?: str,
"faces"?: [[x0, y0, x1, y1], ...]}``: ``rejected_image`` is the dispreferred output of a preference pair (the
target is the preferred one) and ``faces`` the face boxes in the target's pixels (identity loss). A row with sources may leave out its target
for distillation (the teacher makes it; :func:`require_targets` refuses such rows elsewhere). Image paths are
relative to the JSONL file's folder unless absolute. Each folder under the data root is a task (the folder name); JSONL files
directly in the root belong to the task named after the root itself.

A bad row (invalid JSON, missing field, unreadable image) is reported as ``file:line: reason``, skipped and counted;
when no row is usable loading stops with :class:`DataError` carrying the count.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from ..conditioning import check_prompt_text
from ..errors import FireRedError

log = logging.getLogger(__name__)


class DataError(FireRedError):
    """No usable training row (or a malformed weight specification)."""


@dataclass(frozen=True)
class Sample:
    """One validated row. ``uid`` is stable across runs (``task/file-stem:line``) and names cached files."""

    task: str
    sources: tuple[Path, ...]
    target: Path
    instruction: str
    instruction_cn: str
    inverse_instruction: str | None
    inverse_instruction_cn: str | None
    source_sizes: tuple[tuple[int, int], ...]
    target_size: tuple[int, int]
    file: str
    line: int
    rejected: Path | None = None
    faces: tuple[tuple[float, float, float, float], ...] = ()
    target_given: bool = True  # False: a row without target_image (distillation), ``target`` is the last source

    @property
    def uid(self) -> str:
        return f"{self.task}/{Path(self.file).stem}-{self.line:06d}"

    @property
    def has_inverse(self) -> bool:
        return (len(self.sources) == 1 and self.target_given
                and bool(self.inverse_instruction or self.inverse_instruction_cn))


@dataclass(frozen=True)
class BadRow:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class Dataset:
    samples: list[Sample]
    bad: list[BadRow] = field(default_factory=list)

    @property
    def tasks(self) -> list[str]:
        return sorted({s.task for s in self.samples})

    def __len__(self) -> int:
        return len(self.samples)


def parse_weights(spec: str | dict | None, key_type=str) -> dict:
    """``"a=0.5,b=1.2"`` (or a dict) -> ``{"a": 0.5, "b": 1.2}``; ``key_type=int`` for source-count weights."""
    if spec is None or spec == "":
        return {}
    items = spec.items() if isinstance(spec, dict) else (_split_pair(p, spec) for p in str(spec).split(",") if p.strip())
    out = {}
    for key, value in items:
        try:
            k, w = key_type(str(key).strip()), float(value)
        except ValueError as exc:
            raise DataError(f"bad weight {key}={value} in {spec!r}: {exc}") from None
        if w < 0:
            raise DataError(f"weight {key}={value} in {spec!r} is negative")
        out[k] = w
    return out


def _split_pair(part: str, spec: str) -> tuple[str, str]:
    if "=" not in part:
        raise DataError(f"weight {part!r} in {spec!r} is not name=value")
    key, value = part.split("=", 1)
    return key, value


def _image_size(path: Path) -> tuple[int, int]:
    """The size of a fully decodable image: a file whose header is valid but whose data is truncated or corrupt
    fails here, at load, instead of killing the run when the row is first drawn."""
    with Image.open(path) as img:
        img.load()
        return img.size


def parse_row(row: object, base: Path, task: str, file: str, line: int) -> Sample:
    """Validate one decoded JSON row; raise ValueError with the reason when it is unusable."""
    if not isinstance(row, dict):
        raise ValueError(f"row is a {type(row).__name__}, not an object")
    target = row.get("target_image") or row.get("edit_image")
    src = row.get("source_image")
    given = target is not None
    if target is None and isinstance(src, (str, list)) and src:  # distillation's rows: the teacher makes targets
        target = src if isinstance(src, str) else src[-1]
    if not isinstance(target, str) or not target:
        raise ValueError("missing target_image (or edit_image)")
    if src is None:
        sources: list = []
    elif isinstance(src, str):
        sources = [src]
    elif isinstance(src, list) and all(isinstance(s, str) and s for s in src):
        sources = src
    else:
        raise ValueError("source_image must be a path, a list of paths or null")
    texts = {k: row.get(k) for k in ("instruction", "instruction_cn", "inverse_instruction", "inverse_instruction_cn")}
    for key, value in texts.items():
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{key} is not a string")
    if not (texts["instruction"] or texts["instruction_cn"]):
        raise ValueError("neither instruction nor instruction_cn is given")
    for key, value in texts.items():
        if value:
            check_prompt_text(value, key, key)  # an InputError is a ValueError: the row is reported and skipped
    rejected = row.get("rejected_image")
    if rejected is not None and (not isinstance(rejected, str) or not rejected):
        raise ValueError("rejected_image must be a path")
    paths = [Path(p) if Path(p).is_absolute() else base / p for p in [*sources, target, *([rejected] if rejected
                                                                                          else [])]]
    sizes = []
    for p in paths:
        try:
            sizes.append(_image_size(p))
        except FileNotFoundError:
            raise ValueError(f"image not found: {p}") from None
        except Exception as exc:  # noqa: BLE001 - any unreadable image makes the row unusable
            raise ValueError(f"image unreadable: {p} ({exc})") from None
    n = len(sources)
    return Sample(
        task=task, sources=tuple(paths[:n]), target=paths[n],
        instruction=texts["instruction"] or texts["instruction_cn"],
        instruction_cn=texts["instruction_cn"] or texts["instruction"],
        inverse_instruction=texts["inverse_instruction"] or texts["inverse_instruction_cn"] or None,
        inverse_instruction_cn=texts["inverse_instruction_cn"] or texts["inverse_instruction"] or None,
        source_sizes=tuple(sizes[:n]), target_size=sizes[n], file=file, line=line,
        rejected=paths[n + 1] if rejected else None, faces=parse_faces(row.get("faces"), sizes[n]),
        target_given=given,
    )


def require_targets(dataset: Dataset) -> None:
    """Every row has its target image (all objectives but distillation learn from it): else one line naming the
    first row without one."""
    missing = [s for s in dataset.samples if not s.target_given]
    if missing:
        raise DataError(f"{missing[0].file}:{missing[0].line}: no target_image ({len(missing)} row(s) without one); "
                        "only distillation (distill.enabled) trains on rows without targets")


def parse_faces(faces: object, size: tuple[int, int]) -> tuple[tuple[float, float, float, float], ...]:
    """``[[x0, y0, x1, y1], ...]`` in the target's pixels, each box non-empty and inside the image."""
    if faces is None:
        return ()
    if not isinstance(faces, list):
        raise ValueError("faces must be a list of [x0, y0, x1, y1] boxes")
    w, h = size
    out = []
    for k, box in enumerate(faces):
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            raise ValueError(f"faces[{k}] is {box!r}, not [x0, y0, x1, y1]")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise ValueError(f"faces[{k}] {box} is empty or outside the {w}x{h} target")
        out.append((x0, y0, x1, y1))
    return tuple(out)


def read_jsonl(path: Path, task: str) -> tuple[list[Sample], list[BadRow]]:
    samples, bad = [], []
    with open(path, "rb") as fh:  # decoded line by line: one bad byte spoils its row, not the file
        for line_no, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad.append(BadRow(str(path), line_no, f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                                                      f"{exc.start + 1})"))
                continue
            if not text.strip():
                continue
            try:
                samples.append(parse_row(json.loads(text), path.parent, task, str(path), line_no))
            except (ValueError, json.JSONDecodeError) as exc:
                bad.append(BadRow(str(path), line_no, str(exc)))
    return samples, bad


def task_files(root: Path) -> list[tuple[str, Path]]:
    """(task, jsonl) pairs: each sub-folder is a task; JSONL files in the root belong to the root's name."""
    if root.is_file():
        return [(root.parent.name, root)]
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist")
    pairs = [(root.name, f) for f in sorted(root.glob("*.jsonl"))]
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        pairs += [(sub.name, f) for f in sorted(sub.rglob("*.jsonl"))]
    return pairs


def load_dataset(roots: str | Path | list, tasks: list[str] | None = None) -> Dataset:
    """Read every task folder under ``roots``; report bad rows; stop when none is usable.

    ``tasks`` keeps only the named tasks (e.g. the keys of the task weights).
    """
    roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
    samples: list[Sample] = []
    bad: list[BadRow] = []
    files = [pair for r in roots for pair in task_files(Path(r))]
    for task, path in files:
        if tasks and task not in tasks:
            continue
        got, errs = read_jsonl(path, task)
        samples += got
        bad += errs
    for b in bad:
        log.warning("skipping bad row %s", b)
    if bad:
        log.warning("%d bad row(s) skipped, %d usable", len(bad), len(samples))
    if not samples:
        detail = "; ".join(str(b) for b in bad[:5])
        raise DataError(f"no usable training row in {[str(r) for r in roots]}: {len(bad)} bad row(s)"
                        + (f" (first: {detail})" if detail else "") + f" across {len(files)} JSONL file(s)")
    return Dataset(samples, bad)
