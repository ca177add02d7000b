"""Turn a training row into model inputs with the inference code (one piece of code per idea).

References go through :func:`firered_core.references.prepare_references` / ``encode_references`` at the bucket's
sizes, instructions through :func:`firered_core.conditioning.encode_prompts` in the run's prompt mode, targets
through the same VAE encoding and normalisation as references. Offline extraction and online training both call
these, so cached and online runs see identical tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import latents as L
from ..conditioning import PromptEmbeds, encode_prompts
from ..images import load_image
from ..references import RefLatents, encode_image, encode_references, prepare_references, resize_lanczos, vae_pixels
from .buckets import BucketKey, bucket_sizes


@dataclass
class RowImages:
    """The images of one training example in training order: references first, then the target."""

    sources: list[Path]
    target: Path
    source_sizes: list[tuple[int, int]]  # training (w, h) of each reference
    target_size: tuple[int, int]


def row_images(sample, key: BucketKey, target_area: float, reference_area: float, inverse: bool = False,
               order: list[int] | None = None) -> RowImages:
    """Paths and training sizes of a row; ``inverse`` swaps source and target; ``order`` re-orders references."""
    sources, target = list(sample.sources), sample.target
    if inverse:
        if len(sources) != 1:
            raise ValueError(f"{sample.uid}: the inverse edit needs exactly one source image")
        sources, target = [target], sources[0]
        task, n, src, tgt = key
        key = (task, n, (tgt,), src[0])
    tsize, ssizes = bucket_sizes(key, target_area, reference_area)
    if order is not None:
        sources, ssizes = [sources[i] for i in order], [ssizes[i] for i in order]
    return RowImages(sources, target, ssizes, tsize)


def encode_target(vae, path: Path, size: tuple[int, int], device=None, dtype=None) -> torch.Tensor:
    """Target image at ``size`` -> packed, normalised latents [1, L, 64] (float32)."""
    img = load_image(path)
    if img.size != tuple(size):
        img = resize_lanczos(img, *size)
    device = device or next(vae.parameters()).device
    dtype = dtype or next(vae.parameters()).dtype
    z = L.normalize(encode_image(vae, vae_pixels(img).to(device=device, dtype=dtype)), vae.config)
    return L.pack(z).float()


def prepare_row_references(images: RowImages, vl_area: float):
    pics = [load_image(p) for p in images.sources]
    return prepare_references(pics, vl_area=vl_area, vae_sizes=images.source_sizes) if pics else None


def encode_row_prompt(text_encoder, processor, text: str | list[str], refs, mode: str, device=None) -> PromptEmbeds:
    vl = refs.vl_images if refs is not None and len(refs) else None
    return encode_prompts(text_encoder, processor, text, vl, mode=mode, device=device)


def encode_row_references(vae, refs, device=None) -> RefLatents:
    if refs is None or len(refs) == 0:
        return RefLatents(None, [])
    ref = encode_references(vae, refs, device=device)
    return RefLatents(ref.tokens.float(), ref.shapes)
