"""Instruction-embedding cache: one VL-encoder run per (model, prompt, references, sizes, mode), in memory and on disk.

Keys are content hashes, so the same key is the same embedding on every machine:
``sha256(format | model fingerprint | mode | prompt | image hash...)`` (:func:`embed_key`) where an image hash covers
the VL-sized picture (mode, size and pixel bytes) and the model fingerprint covers the text encoder's class, config
(without the path it was loaded from) and a sample of its weights (:func:`model_fingerprint`).

One disk format for inference and training: ``<dir>/<key[:2]>/<key>.safetensors`` (:func:`embed_path`) holding
``embeds`` [L, D] (one prompt, valid tokens only, after the template drop) and string metadata ``prompt``, ``mode``,
``model``, ``images`` (comma-joined image hashes) and ``format`` = ``firered-embeds/1``, written atomically with a
sorted header (byte-stable). Inference writes it through :class:`EmbedCache` with a ``disk`` folder
(``ModelSettings.embed_cache_dir``, CLI ``--embed-cache-dir``); the training extractor
(``firered_core/training/extract.py``) writes ``<extraction>/embeds`` through the same class, and its row files
only reference keys. Either side reuses the other's files: inference pointed at an extraction's ``embeds`` folder does
not run the VL encoder for an extracted (instruction, references, ``vl_area``, prompt mode), and an extraction finds
what inference already encoded there.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
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
    """Class, config and the first values of a few weights: cheap, and different for different checkpoints.

    The config's ``_name_or_path`` is left out: the same checkpoint at another path (another machine, the training
    tools' copy) must give the same keys.
    """
    if text_encoder in _fingerprints:
        return _fingerprints[text_encoder]
    h = hashlib.sha256(type(text_encoder).__name__.encode())
    config = getattr(text_encoder, "config", None)
    if config is not None:
        values = config.to_dict() if hasattr(config, "to_dict") else config
        h.update(json.dumps(_without_paths(values), sort_keys=True, default=str).encode())
    params = [p for _, p in sorted(text_encoder.state_dict().items())]
    for p in params[:: max(1, len(params) // 8)]:
        h.update(p.flatten()[:4096].detach().float().cpu().numpy().tobytes())
    _fingerprints[text_encoder] = h.hexdigest()
    return _fingerprints[text_encoder]


def _without_paths(value):
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items() if k != "_name_or_path"}
    return value


def embed_key(model: str, prompt: str, images: list[str], mode: str) -> str:
    """The cache key of one prompt's embeddings (``images`` are :func:`image_hash` values in order)."""
    return hashlib.sha256("\x1f".join([FORMAT, model, mode, prompt, *images]).encode()).hexdigest()


def embed_path(root: str | Path, key: str) -> Path:
    return Path(root) / key[:2] / f"{key}.safetensors"


def canonical_safetensors(data: bytes) -> bytes:
    """The same file with its JSON header's keys sorted: safetensors writes metadata in hash order, so two saves of
    the same tensors and metadata can differ byte for byte."""
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + size:]


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Byte-stable (sorted header) and atomic: written under a unique temporary name and renamed, so a crash or a
    concurrent writer of the same key never leaves a half file under the final name."""
    from safetensors.torch import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = canonical_safetensors(save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                                      metadata=metadata))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_embeds(path: str | Path, embeds: torch.Tensor, metadata: dict[str, str]) -> None:
    write_safetensors(path, {"embeds": embeds}, {"format": FORMAT, **metadata})


def load_embeds(path: str | Path) -> torch.Tensor | None:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        if (f.metadata() or {}).get("format") != FORMAT:
            return None
        return f.get_tensor("embeds")


class EmbedCache:
    """Memory LRU of per-prompt embeddings, optionally backed by a disk folder. Counts what it encoded."""

    def __init__(self, max_items: int = 64, disk: str | Path | None = None):
        self.max_items = max_items
        self.disk = Path(disk) if disk else None
        self.items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0
        self._lock = threading.Lock()

    def path(self, key: str) -> Path:
        return embed_path(self.disk, key)

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

    def encode(self, encode_fn, model: str, prompts: list[str], images: list[Image.Image] | None, mode: str,
               device=None, dtype=None) -> PromptEmbeds:
        """:meth:`encode_pieces` as one padded batch."""
        return PromptEmbeds.from_pieces(self.encode_pieces(encode_fn, model, prompts, images, mode, device,
                                                           dtype)[1])

    def encode_pieces(self, encode_fn, model: str, prompts: list[str], images: list[Image.Image] | None,
                      mode: str, device=None, dtype=None) -> tuple[list[str], list[torch.Tensor]]:
        """Each prompt's key and [L, D] embedding; ``encode_fn(prompts) -> [L_i, D] per prompt`` runs only for the
        prompts not cached, whose pieces are stored (and saved). ``model`` is the encoder's fingerprint
        (:func:`model_fingerprint`, ``FireRedModel.prompt_fingerprint``)."""
        hashes = [image_hash(im) for im in images or []]
        keys = [embed_key(model, p, hashes, mode) for p in prompts]
        found = {k: self._get(k, device, dtype) for k in dict.fromkeys(keys)}
        todo = [p for p, k in zip(prompts, keys) if found[k] is None]
        todo = list(dict.fromkeys(todo))
        self.hits += len(prompts) - len(todo)
        self.misses += len(todo)
        if todo:
            for prompt, piece in zip(todo, encode_fn(todo)):
                key = embed_key(model, prompt, hashes, mode)
                found[key] = piece
                self._put(key, piece)
                if self.disk is not None:
                    save_embeds(self.path(key), piece, {"prompt": prompt, "mode": mode, "model": model,
                                                        "images": ",".join(hashes)})
        return keys, [found[k] for k in keys]


_default: EmbedCache | None = None


def default_cache() -> EmbedCache:
    """The process-wide memory cache (the CLI, the nodes and the pipeline share it)."""
    global _default
    if _default is None:
        _default = EmbedCache()
    return _default
