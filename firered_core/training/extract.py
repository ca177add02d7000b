"""Offline extraction of instruction embeddings (and optionally VAE latents), sharded and resumable.

Instruction embeddings use the inference embedding cache's one format and key (``firered_core/embed_cache.py``):
each (variant text, VL-sized references, prompt mode) goes through :class:`~firered_core.embed_cache.EmbedCache` with
the disk folder ``<output>/embeds``, so it is one ``embeds/<key[:2]>/<key>.safetensors`` keyed by
:func:`~firered_core.embed_cache.embed_key` over the same model fingerprint and picture hashes as inference. A prompt
whose file is already there (an earlier extraction, or inference run with ``--embed-cache-dir <output>/embeds``) is
not encoded again, and inference pointed at that folder does not run the VL encoder for an extracted instruction.

Each row becomes one ``rows/<task>/<file>-<line>.safetensors`` whose metadata maps ``embeds.<variant>`` to the key of
every requested variant the row has (``en``, ``cn``, ``empty``, ``inverse``, ``inverse_cn``) and whose tensors, with
latent caching, are ``latents.target`` / ``latents.refs`` (packed, normalised, at the row's bucket sizes;
``latents.inverse_*`` for the inverse edit). :class:`EmbeddingStore` resolves the keys, so the trainer sees
``embeds.<variant>`` [L, D] tensors as before. Every file is written to a temporary name and renamed with a sorted
header (byte-stable), so a crash never leaves a half file under the final name; a restarted run skips every row whose
file exists. Process ``r`` of ``n`` handles rows ``r, r + n, ...``. The manifest (written last, by the main process)
records the prompt mode, sizes, variants, the embeddings folder and the row -> file map.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..conditioning import PROMPT_MODES, encode_prompts
from ..errors import ConfigError
from ..embed_cache import EmbedCache, embed_path, load_embeds, write_safetensors
from ..geometry import VAE_AREA, VL_AREA
from ..model import load_model
from .alignment import variant_text
from .alignment import VARIANTS
from .buckets import bucket_key
from .data import DataError, load_dataset
from .rows import row_images, row_latents, row_references, vl_images

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "firered-embeddings/2"
EMBEDS = "embeds"


@dataclass
class ExtractConfig:
    model: str
    data: str | list
    output_dir: str
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    prompt_mode: str = "pipeline"
    vl_area: float = VL_AREA
    cache_latents: bool = False
    target_area: float = VAE_AREA
    reference_area: float = VAE_AREA
    dtype: str = "fp32"
    tasks: list[str] | None = None

    def __post_init__(self):
        if self.prompt_mode not in PROMPT_MODES:
            raise ConfigError(f"prompt_mode {self.prompt_mode!r} is not one of {PROMPT_MODES}")
        bad = set(self.variants) - set(VARIANTS)
        if bad:
            raise ConfigError(f"unknown variant(s) {sorted(bad)}; choose from {VARIANTS}")


def row_file(output_dir: Path, uid: str) -> Path:
    return output_dir / "rows" / f"{uid}.safetensors"


def embed_cache(output_dir: Path) -> EmbedCache:
    """The extraction's view of the shared disk cache (no memory copies: each key is needed once)."""
    return EmbedCache(max_items=0, disk=output_dir / EMBEDS)


def encode_row(model, sample, cfg: ExtractConfig, cache: EmbedCache) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The row's latent tensors and its ``embeds.<variant>`` -> key map (each embedding encoded only if missing)."""
    key = bucket_key(sample)
    tensors: dict[str, torch.Tensor] = {}
    keys: dict[str, str] = {}
    te, proc, vae = model.text_encoder, model.processor, model.vae
    for inverse in (False, True):
        names = [v for v in cfg.variants if v.startswith("inverse") == inverse]
        if not names or (inverse and not sample.has_inverse):
            continue
        images = row_images(sample, key, cfg.target_area, cfg.reference_area, inverse=inverse)
        refs = row_references(images, cfg.vl_area)
        vl = vl_images(refs)
        for v in names:
            text = variant_text(sample, v)
            if v != "empty" and not text:
                continue
            (keys[f"embeds.{v}"],), _ = cache.encode_pieces(
                lambda todo: encode_prompts(te, proc, todo, vl, mode=cfg.prompt_mode, device=model.device).pieces(),
                model.prompt_fingerprint(), [text], vl, cfg.prompt_mode, device=model.device, dtype=te.dtype)
        if cfg.cache_latents:
            prefix = "latents.inverse_" if inverse else "latents."
            x0, ref = row_latents(vae, images, refs, model.device)
            tensors[prefix + "target"] = x0.cpu()
            if ref.tokens is not None:
                tensors[prefix + "refs"] = ref.tokens.cpu()
    return tensors, keys


def extract(cfg: ExtractConfig, rank: int = 0, world_size: int = 1, device: str = "cpu", wait=None) -> dict:
    """Encode this process's share of rows; the main process writes the manifest once all shares are done.

    ``wait`` is a barrier (e.g. ``accelerator.wait_for_everyone``) for multi-process runs. Returns a summary.
    """
    out = Path(cfg.output_dir)
    dataset = load_dataset(cfg.data, cfg.tasks)
    mine = dataset.samples[rank::world_size]
    todo = [s for s in mine if not row_file(out, s.uid).exists()]
    log.info("rank %d: %d of %d rows to encode (%d already done)", rank, len(todo), len(mine), len(mine) - len(todo))
    model = load_model(cfg.model, dtype=cfg.dtype, device=device)
    cache = embed_cache(out)
    done = 0
    for sample in todo:
        tensors, keys = encode_row(model, sample, cfg, cache)
        write_safetensors(row_file(out, sample.uid), tensors,
                          {"uid": sample.uid, "prompt_mode": cfg.prompt_mode, **keys})
        done += 1
    if wait is not None:
        wait()
    manifest = {}
    if rank == 0:
        manifest = write_manifest(cfg, dataset)
    return {"encoded": done, "skipped": len(mine) - len(todo), "bad_rows": len(dataset.bad),
            "prompts_encoded": cache.misses, "prompts_reused": cache.hits, "manifest": manifest}


def write_manifest(cfg: ExtractConfig, dataset) -> dict:
    out = Path(cfg.output_dir)
    missing = [s.uid for s in dataset.samples if not row_file(out, s.uid).exists()]
    if missing:
        raise DataError(f"{len(missing)} row file(s) missing (first: {missing[0]}); rerun the extraction")
    manifest = {
        "format": FORMAT, "embeds": EMBEDS, "model": str(cfg.model), "prompt_mode": cfg.prompt_mode,
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
    """Reads an extraction's rows for training, embeddings resolved from their keys; checks the manifest matches."""

    def __init__(self, path: str | Path, prompt_mode: str | None = None):
        self.root = Path(path)
        file = self.root / MANIFEST
        if not file.exists():
            raise FileNotFoundError(f"no {MANIFEST} in {self.root}: run training/extract_embeddings.py to the end")
        self.manifest = json.loads(file.read_text())
        if self.manifest.get("format") != FORMAT:
            raise DataError(f"embeddings in {self.root} are {self.manifest.get('format')!r}, not {FORMAT!r}: "
                             f"extract them again")
        self.embeds = self.root / self.manifest["embeds"]
        if prompt_mode is not None and self.manifest["prompt_mode"] != prompt_mode:
            raise DataError(f"embeddings in {self.root} were extracted in prompt mode "
                             f"{self.manifest['prompt_mode']!r} but the run asks for {prompt_mode!r}")

    def load(self, uid: str) -> dict[str, torch.Tensor]:
        rel = self.manifest["rows"].get(uid)
        if rel is None:
            raise DataError(f"row {uid} is not in the embeddings at {self.root} (extracted from other data?)")
        with safe_open(str(self.root / rel), "pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
            keys = {name: key for name, key in (f.metadata() or {}).items() if name.startswith("embeds.")}
        for name, key in keys.items():
            tensors[name] = load_embeds(embed_path(self.embeds, key))
            if tensors[name] is None:
                raise FileNotFoundError(f"row {uid}: {name} file {embed_path(self.embeds, key)} is missing or not "
                                        f"an embedding; rerun the extraction")
        return tensors
