"""A training row's images at its bucket's sizes, and their latents, through the inference stages.

References go through :func:`firered_core.references.prepare_references` / ``encode_references`` at the bucket's
sizes, targets through the same VAE encoding and normalisation (:func:`firered_core.references.encode_pixels`).
Offline extraction and both input builders (:mod:`.inputs`) call these, so cached and online runs see identical
tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..images import load_image
from ..references import RefImages, RefLatents, encode_pixels, encode_references, prepare_references, resize_lanczos
from ..references import vae_pixels
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


def row_references(images: RowImages, vl_area: float) -> RefImages:
    """The row's references prepared for both encoders at its training sizes (none for text-to-image rows)."""
    return prepare_references([load_image(p) for p in images.sources], vl_area=vl_area,
                              vae_sizes=images.source_sizes)


def vl_images(refs: RefImages):
    """What the VL encoder sees of ``refs`` (None without references)."""
    return refs.vl_images if len(refs) else None


def row_latents(vae, images: RowImages, refs: RefImages, device=None) -> tuple[torch.Tensor, RefLatents]:
    """The target at its training size and the references as packed, normalised float32 latents."""
    img = load_image(images.target)
    if img.size != tuple(images.target_size):
        img = resize_lanczos(img, *images.target_size)
    device = device or next(vae.parameters()).device
    x0 = encode_pixels(vae, vae_pixels(img), device).float()
    return x0, encode_references(vae, refs, device=device).to(dtype=torch.float32)
