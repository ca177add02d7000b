"""Generate a bench's edited images with our pipeline: resumable, sharded across processes, with a manifest.

- Output layout ``<out>/<task>/<task>-<id>.png`` (:func:`benches.output_path`); a row whose image exists is skipped,
  so a killed run resumes where it stopped. Images are written under a temporary name and renamed, so a kill never
  leaves a half-written PNG that a resume would take for done.
- Process ``rank`` of ``world`` takes rows ``rank, rank + world, ...``; ranks come from the environment
  (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``, set by torchrun and accelerate), one process by default. Each row's
  noise comes from its own CPU generator seeded with ``--seed``, so an image does not depend on which process made
  it or on what ran before it.
- ``manifest.json`` records the exact settings, the model's fingerprint (per component, :func:`model_fingerprint`),
  LoRA file hashes and package versions; a resume with different settings into the same folder is refused, naming
  what differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import uuid
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from PIL import Image

from ..errors import FireRedError
from ..images import load_image
from .benches import BenchRow, output_path

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT = "firered-bench-run/1"


class RunMismatch(FireRedError):
    """The output folder holds a run made with other settings."""


def ranks_from_env(env=None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun / accelerate variables; (0, 1, 0) without them."""
    env = os.environ if env is None else env
    try:
        rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError as exc:
        raise FireRedError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({exc})") from None
    if world < 1 or not 0 <= rank < world:
        raise FireRedError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, world, local


def shard(rows: list[BenchRow], rank: int, world: int) -> list[BenchRow]:
    return rows[rank::world]


@dataclass(frozen=True)
class EditSettings:
    """The sampling settings of every edit of a run (the CLI's edit arguments, steps resolved)."""

    steps: int
    true_cfg: float
    seed: int
    negative_prompt: str
    width: int | None
    height: int | None
    match_input: bool
    shift: float | None
    vl_area: int
    vae_area: int
    prompt_mode: str

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= 1000:
            raise FireRedError(f"--steps {self.steps} must be in [1, 1000]")

    @classmethod
    def from_args(cls, args, steps: int) -> "EditSettings":
        return cls(steps=steps, true_cfg=args.true_cfg, seed=args.seed, negative_prompt=args.negative_prompt,
                   width=args.width, height=args.height, match_input=args.match_input_size, shift=args.shift,
                   vl_area=args.vl_area, vae_area=args.vae_area, prompt_mode=args.prompt_mode)

    def edit_kwargs(self) -> dict:
        return dict(negative_prompt=self.negative_prompt, steps=self.steps, true_cfg=self.true_cfg, seed=self.seed,
                    width=self.width, height=self.height, vl_area=self.vl_area, vae_area=self.vae_area,
                    prompt_mode=self.prompt_mode, shift=self.shift, match_input=self.match_input)


def pipeline_from_settings(model, speed):
    """The one place that knows the shape of the speed settings: the run half goes to the pipeline (the model half
    is already the model's). Also returns them as a dict (the manifest's identity) and the fields that differ from
    the defaults (the report's settings line)."""
    from ..pipeline import EditPipeline
    from ..speed import SpeedSettings

    values, defaults = speed.model_dump(), SpeedSettings().model_dump()
    changed = {k: v for half, fields in values.items() for k, v in fields.items() if v != defaults[half][k]}
    return EditPipeline(model, speed.run), values, changed


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("comfyui-firered-edit", "torch", "diffusers", "transformers", "accelerate", "kornia", "pillow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def model_identity(model, loras: list) -> dict:
    """Fingerprints of each component (class, config, a sample of weights) and each LoRA's file hash + strength."""
    from ..embed_cache import model_fingerprint

    out = {name: model_fingerprint(model.get(name)) for name in ("transformer", "vae", "text_encoder")}
    out["dtype"] = str(model.dtype).replace("torch.", "")
    out["loras"] = [{"file": Path(s.path).name, "sha256": file_sha256(s.path), "strength": s.strength}
                    for s in loras]
    return out


def build_manifest(*, bench: dict, selection: dict, edit: EditSettings, speed: dict, speed_changed: dict,
                   model: dict, sources: dict, world_size: int) -> dict:
    """``identity`` is what a resume must match; the rest (paths, versions, process count) is informative."""
    return {"format": FORMAT, "identity": {"bench": bench, "edit": asdict(edit), "speed": speed, "model": model},
            "speed_changed": speed_changed, "selection": selection, "sources": sources, "versions": versions(),
            "world_size": world_size}


def diff(a, b, prefix: str = "") -> list[str]:
    """Dotted paths where two nested dicts differ, as 'path: a -> b'."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)


def write_manifest(out: str | Path, manifest: dict, force: bool = False) -> None:
    """Write (atomically; every rank writes the same content) after checking a previous run's identity."""
    path = Path(out) / MANIFEST
    if path.is_file() and not force:
        old = json.loads(path.read_text(encoding="utf-8"))
        diffs = diff(old.get("identity"), manifest["identity"])
        if diffs:
            raise RunMismatch(f"{path}: this folder holds a run made with other settings ({'; '.join(diffs[:6])}); "
                              "use another --out, or --force to mix them")
    write_json_atomic(path, manifest)


def read_manifest(out: str | Path) -> dict | None:
    path = Path(out) / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def save_image_atomic(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def _remove_partials(path: Path) -> None:
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def generate(rows: list[BenchRow], out: str | Path, pipeline, settings: EditSettings, rank: int = 0,
             world: int = 1, progress: bool = True) -> dict:
    """Edit this process's share of ``rows`` that has no output yet. Returns counts and the rows that failed on
    bad input (logged, listed, the rest continues; the judge later counts them as failures)."""
    from tqdm import tqdm

    mine = shard(rows, rank, world)
    todo = [r for r in mine if not output_path(out, r).is_file()]
    log.info("rank %d/%d: %d of %d rows to generate (%d already done)", rank, world, len(todo), len(mine),
             len(mine) - len(todo))
    done, failed = 0, []
    bar = tqdm(todo, desc=f"generate {rank + 1}/{world}" if world > 1 else "generate", unit="img",
               position=rank, disable=not progress)
    for row in bar:
        path = output_path(out, row)
        _remove_partials(path)
        try:
            image = load_image(row.source)
            result = pipeline.edit([image], row.instruction, **settings.edit_kwargs())
        except FireRedError as exc:
            log.error("%s (line %d): %s", row.key, row.line, exc)
            failed.append({"key": row.key, "error": str(exc)})
            continue
        save_image_atomic(result.images[0], path)
        done += 1
    return {"generated": done, "skipped": len(mine) - len(todo), "failed": failed, "rows": len(mine)}
