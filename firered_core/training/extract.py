"""Offline extraction of instruction embeddings (and optionally VAE latents), sharded and resumable.

Each row becomes one ``rows/<task>/<file>-<line>.safetensors`` holding ``embeds.<variant>`` [L, D] for every
requested variant the row has (``en``, ``cn``, ``empty``, ``inverse``, ``inverse_cn``) and, with latent caching,
``latents.target`` / ``latents.refs`` (packed, normalised, at the row's bucket sizes; ``latents.inverse_*`` for the
inverse edit). Files are written to a temporary name and renamed, so a crash never leaves a half file under the final
name; a restarted run skips every row whose file exists. Process ``r`` of ``n`` handles rows ``r, r + n, ...``.
The manifest (written last, by the main process) records the prompt mode, sizes, variants and the row -> file map.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from ..conditioning import PROMPT_MODES
from ..geometry import VAE_AREA, VL_AREA
from ..model import load_model
from .alignment import variant_text
from .buckets import bucket_key
from .data import load_dataset
from .encode import encode_row_prompt, encode_row_references, encode_target, prepare_row_references, row_images

log = logging.getLogger(__name__)

ALL_VARIANTS = ("en", "cn", "empty", "inverse", "inverse_cn")
MANIFEST = "manifest.json"


@dataclass
class ExtractConfig:
    model: str
    data: str | list
    output_dir: str
    variants: list[str] = field(default_factory=lambda: ["en", "cn", "empty", "inverse", "inverse_cn"])
    prompt_mode: str = "pipeline"
    vl_area: float = VL_AREA
    cache_latents: bool = False
    target_area: float = VAE_AREA
    reference_area: float = VAE_AREA
    dtype: str = "fp32"
    tasks: list[str] | None = None

    def __post_init__(self):
        if self.prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompt_mode {self.prompt_mode!r} is not one of {PROMPT_MODES}")
        bad = set(self.variants) - set(ALL_VARIANTS)
        if bad:
            raise ValueError(f"unknown variant(s) {sorted(bad)}; choose from {ALL_VARIANTS}")


class SimulatedCrash(RuntimeError):
    """Raised by ``stop_after`` (tests): the process dies as if killed between two rows."""


def row_file(output_dir: Path, uid: str) -> Path:
    return output_dir / "rows" / f"{uid}.safetensors"


def canonical_safetensors(data: bytes) -> bytes:
    """The same file with its JSON header's keys sorted: safetensors writes metadata in hash order, so two saves of
    the same tensors and metadata can differ byte for byte."""
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + size:]


def _atomic_save(tensors: dict, path: Path, metadata: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(canonical_safetensors(save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)))
    os.replace(tmp, path)


def encode_row(model, sample, cfg: ExtractConfig) -> dict[str, torch.Tensor]:
    key = bucket_key(sample)
    tensors: dict[str, torch.Tensor] = {}
    te, proc, vae = model.text_encoder, model.processor, model.vae
    for inverse in (False, True):
        names = [v for v in cfg.variants if v.startswith("inverse") == inverse]
        if not names or (inverse and not sample.has_inverse):
            continue
        images = row_images(sample, key, cfg.target_area, cfg.reference_area, inverse=inverse)
        refs = prepare_row_references(images, cfg.vl_area)
        for v in names:
            text = variant_text(sample, v)
            if v != "empty" and not text:
                continue
            emb = encode_row_prompt(te, proc, text, refs, cfg.prompt_mode, device=model.device)
            tensors[f"embeds.{v}"] = emb.embeds[0].to(model.dtype).cpu()
        if cfg.cache_latents:
            prefix = "latents.inverse_" if inverse else "latents."
            tensors[prefix + "target"] = encode_target(vae, images.target, images.target_size, model.device).cpu()
            ref = encode_row_references(vae, refs, model.device)
            if ref.tokens is not None:
                tensors[prefix + "refs"] = ref.tokens.cpu()
    return tensors


def extract(cfg: ExtractConfig, rank: int = 0, world_size: int = 1, device: str = "cpu",
            stop_after: int | None = None, wait=None) -> dict:
    """Encode this process's share of rows; the main process writes the manifest once all shares are done.

    ``wait`` is a barrier (e.g. ``accelerator.wait_for_everyone``) for multi-process runs. Returns a summary.
    """
    out = Path(cfg.output_dir)
    dataset = load_dataset(cfg.data, cfg.tasks)
    mine = dataset.samples[rank::world_size]
    todo = [s for s in mine if not row_file(out, s.uid).exists()]
    log.info("rank %d: %d of %d rows to encode (%d already done)", rank, len(todo), len(mine), len(mine) - len(todo))
    model = load_model(cfg.model, dtype=cfg.dtype, device=device)
    done = 0
    for sample in todo:
        if stop_after is not None and done >= stop_after:
            raise SimulatedCrash(f"stopped after {done} rows")
        tensors = encode_row(model, sample, cfg)
        _atomic_save(tensors, row_file(out, sample.uid), {"uid": sample.uid, "prompt_mode": cfg.prompt_mode})
        done += 1
    if wait is not None:
        wait()
    manifest = {}
    if rank == 0:
        manifest = write_manifest(cfg, dataset)
    return {"encoded": done, "skipped": len(mine) - len(todo), "bad_rows": len(dataset.bad), "manifest": manifest}


def write_manifest(cfg: ExtractConfig, dataset) -> dict:
    out = Path(cfg.output_dir)
    missing = [s.uid for s in dataset.samples if not row_file(out, s.uid).exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} row file(s) missing (first: {missing[0]}); rerun the extraction")
    manifest = {
        "format": "firered-embeddings/1", "model": str(cfg.model), "prompt_mode": cfg.prompt_mode,
        "variants": list(cfg.variants), "vl_area": cfg.vl_area, "cache_latents": cfg.cache_latents,
        "target_area": cfg.target_area, "reference_area": cfg.reference_area, "dtype": cfg.dtype,
        "rows": {s.uid: str(row_file(out, s.uid).relative_to(out)) for s in dataset.samples},
        "config": asdict(cfg),
    }
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str))
    os.replace(tmp, out / MANIFEST)
    return manifest


class EmbeddingStore:
    """Reads an extraction's rows for training; checks the manifest matches the run."""

    def __init__(self, path: str | Path, prompt_mode: str | None = None):
        self.root = Path(path)
        file = self.root / MANIFEST
        if not file.exists():
            raise FileNotFoundError(f"no {MANIFEST} in {self.root}: run training/extract_embeddings.py to the end")
        self.manifest = json.loads(file.read_text())
        if prompt_mode is not None and self.manifest["prompt_mode"] != prompt_mode:
            raise ValueError(f"embeddings in {self.root} were extracted in prompt mode "
                             f"{self.manifest['prompt_mode']!r} but the run asks for {prompt_mode!r}")

    def load(self, uid: str) -> dict[str, torch.Tensor]:
        rel = self.manifest["rows"].get(uid)
        if rel is None:
            raise KeyError(f"row {uid} is not in the embeddings at {self.root} (extracted from other data?)")
        return load_file(str(self.root / rel))
