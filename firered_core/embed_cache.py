"""Instruction-embedding cache: one VL-encoder run per (model, prompt, references, sizes, mode) and process.

Keys are content hashes, so the same key is the same embedding on every machine:
``sha256(model fingerprint | mode | prompt | image hash...)`` where an image hash covers the VL-sized picture
(mode, size and pixel bytes) and the model fingerprint covers the text encoder's class, config and a sample of its
weights (:func:`model_fingerprint`).

Disk layout (shared with the training extractor, ``firered_core/training/extract.py``): ``<dir>/<key[:2]>/<key>.safetensors``
holding ``embeds`` [L, D] (one prompt, valid tokens only, after the template drop) and string metadata ``prompt``,
``mode``, ``model``, ``images`` (comma-joined image hashes) and ``format`` = ``firered-embeds/1``. Writers use
:func:`embed_key` and :func:`save_embeds`; readers :func:`load_embeds`.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import weakref
from collections import OrderedDict
from pathlib import Path

import torch
from PIL import Image

from .conditioning import PromptEmbeds

FORMAT = "firered-embeds/1"
_fingerprints: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def image_hash(img: Image.Image) -> str:
    h = hashlib.sha256(f"{img.mode}:{img.size}".encode())
    h.update(img.tobytes())
    return h.hexdigest()


@torch.no_grad()
def model_fingerprint(text_encoder: torch.nn.Module) -> str:
    """Class, config and the first values of a few weights: cheap, and different for different checkpoints."""
    if text_encoder in _fingerprints:
        return _fingerprints[text_encoder]
    h = hashlib.sha256(type(text_encoder).__name__.encode())
    config = getattr(text_encoder, "config", None)
    if config is not None:
        h.update(config.to_json_string(use_diff=False).encode() if hasattr(config, "to_json_string")
                 else json.dumps(config, sort_keys=True, default=str).encode())
    params = [p for _, p in sorted(text_encoder.state_dict().items())]
    for p in params[:: max(1, len(params) // 8)]:
        h.update(p.flatten()[:4096].detach().float().cpu().numpy().tobytes())
    _fingerprints[text_encoder] = h.hexdigest()
    return _fingerprints[text_encoder]


def embed_key(model: str, prompt: str, images: list[str], mode: str) -> str:
    """The cache key of one prompt's embeddings (``images`` are :func:`image_hash` values in order)."""
    return hashlib.sha256("\x1f".join([FORMAT, model, mode, prompt, *images]).encode()).hexdigest()


def save_embeds(path: str | Path, embeds: torch.Tensor, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({"embeds": embeds.detach().contiguous().cpu()}, str(tmp), metadata={"format": FORMAT, **metadata})
    os.replace(tmp, path)


def load_embeds(path: str | Path) -> torch.Tensor | None:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        if (f.metadata() or {}).get("format") != FORMAT:
            return None
        return f.get_tensor("embeds")


def pad_embeds(pieces: list[torch.Tensor]) -> PromptEmbeds:
    """Per-prompt [L_i, D] -> [B, L, D] right-padded with zeros and masked, as ``encode_prompts`` returns them."""
    length = max(p.shape[0] for p in pieces)
    embeds = torch.stack([torch.cat([p, p.new_zeros(length - p.shape[0], p.shape[1])]) for p in pieces])
    mask = torch.stack([torch.arange(length, device=embeds.device) < p.shape[0] for p in pieces]).long()
    return PromptEmbeds(embeds, None if bool(mask.all()) else mask)


class EmbedCache:
    """Memory LRU of per-prompt embeddings, optionally backed by a disk folder. Counts what it encoded."""

    def __init__(self, max_items: int = 64, disk: str | Path | None = None):
        self.max_items = max_items
        self.disk = Path(disk) if disk else None
        self.items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0
        self._lock = threading.Lock()

    def path(self, key: str) -> Path:
        return self.disk / key[:2] / f"{key}.safetensors"

    def _get(self, key: str, device, dtype) -> torch.Tensor | None:
        with self._lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        found = load_embeds(self.path(key)) if self.disk else None
        if found is not None:
            found = found.to(device=device, dtype=dtype)
            self._put(key, found)
        return found

    def _put(self, key: str, value: torch.Tensor) -> None:
        with self._lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.max_items:
                self.items.popitem(last=False)

    def encode(self, encode_fn, text_encoder, prompts: list[str], images: list[Image.Image] | None, mode: str,
               device=None, dtype=None) -> PromptEmbeds:
        """``encode_fn(prompts) -> PromptEmbeds`` runs only for prompts not cached; the batch is re-assembled."""
        model = model_fingerprint(text_encoder)
        hashes = [image_hash(im) for im in images or []]
        keys = [embed_key(model, p, hashes, mode) for p in prompts]
        found = {k: self._get(k, device, dtype) for k in dict.fromkeys(keys)}
        todo = [p for p, k in zip(prompts, keys) if found[k] is None]
        todo = list(dict.fromkeys(todo))
        self.hits += len(prompts) - len(todo)
        self.misses += len(todo)
        if todo:
            fresh = encode_fn(todo)
            for i, prompt in enumerate(todo):
                n = int(fresh.mask[i].sum()) if fresh.mask is not None else fresh.embeds.shape[1]
                piece = fresh.embeds[i, :n]
                key = embed_key(model, prompt, hashes, mode)
                found[key] = piece
                self._put(key, piece)
                if self.disk is not None:
                    save_embeds(self.path(key), piece, {"prompt": prompt, "mode": mode, "model": model,
                                                        "images": ",".join(hashes)})
        return pad_embeds([found[k] for k in keys])


_default: EmbedCache | None = None


def default_cache() -> EmbedCache:
    """The process-wide memory cache (the CLI, the nodes and the pipeline share it)."""
    global _default
    if _default is None:
        _default = EmbedCache()
    return _default
