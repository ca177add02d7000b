"""Reference images: resized once for the VL encoder and once for the VAE, then VAE-encoded into packed tokens.

Image ``k`` (1-based) becomes frame ``k`` of the transformer's 3-D RoPE through its place in ``img_shapes``; the
order of ``images`` is the order the instruction's "Picture N" labels refer to.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from . import latents as L
from .geometry import VAE_AREA, VL_AREA, calculate_dimensions
from .images import to_rgb

log = logging.getLogger(__name__)

NATIVE_MAX_REFERENCES = 3


@dataclass
class RefImages:
    """References prepared for both encoders. ``vae_pixels[k]`` is [1, 3, 1, H, W] in -1..1."""

    vl_images: list[Image.Image]
    vae_pixels: list[torch.Tensor]
    vae_sizes: list[tuple[int, int]]
    source_sizes: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.vl_images)


@dataclass
class RefLatents:
    """Packed, normalised reference tokens [1, L, 64] and their ``img_shapes`` entries (frames, rows, cols)."""

    tokens: torch.Tensor | None
    shapes: list[tuple[int, int, int]]

    def to(self, device=None, dtype=None) -> "RefLatents":
        tokens = None if self.tokens is None else self.tokens.to(device=device, dtype=dtype)
        return RefLatents(tokens, self.shapes)


def resize_lanczos(img: Image.Image, width: int, height: int) -> Image.Image:
    return img.resize((width, height), resample=Image.LANCZOS)


def vae_range(images: torch.Tensor) -> torch.Tensor:
    """Images [B, H, W, C] in 0..1 (ComfyUI's IMAGE layout; channels past 3 dropped) -> VAE input [B, 3, 1, H, W]
    in -1..1 (as diffusers' VaeImageProcessor.preprocess)."""
    return (2.0 * images[..., :3] - 1.0).permute(0, 3, 1, 2).unsqueeze(2)


def vae_pixels(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [1, 3, 1, H, W] float32 in -1..1."""
    return vae_range(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None])


def prepare_references(images: list[Image.Image], vl_area: float = VL_AREA, vae_area: float = VAE_AREA,
                       vae_sizes: list[tuple[int, int]] | None = None) -> RefImages:
    """Resize each image for the VL encoder (~``vl_area``) and the VAE (~``vae_area``, or the given exact sizes).

    Sizes are multiples of 32 at each image's own aspect ratio, resampled with Lanczos, as the reference pipeline.
    More than three images works but is outside what the model was trained for, so it warns.
    """
    if len(images) > NATIVE_MAX_REFERENCES:
        log.warning("%d reference images given; FireRed is trained on 1-3 (2 recommended)", len(images))
    vl, pixels, sizes, sources = [], [], [], []
    for k, img in enumerate(images):
        img = to_rgb(img)
        w, h = img.size
        vw, vh = calculate_dimensions(vl_area, w / h)
        aw, ah = vae_sizes[k] if vae_sizes is not None else calculate_dimensions(vae_area, w / h)
        vl.append(resize_lanczos(img, vw, vh))
        pixels.append(vae_pixels(img if (aw, ah) == (w, h) else resize_lanczos(img, aw, ah)))
        sizes.append((aw, ah))
        sources.append((w, h))
    return RefImages(vl, pixels, sizes, sources)


@torch.no_grad()
def encode_image(vae, pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, 1, H, W] pixels -> raw (un-normalised) latents [B, 16, 1, H/8, W/8] by the posterior's mode."""
    return vae.encode(pixels).latent_dist.mode()


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor, device=None, dtype=None) -> torch.Tensor:
    """[1, 3, 1, H, W] pixels -> packed, normalised latents [1, L, 64] (on ``device`` in ``dtype``, default the VAE's)."""
    device = device or next(vae.parameters()).device
    dtype = dtype or next(vae.parameters()).dtype
    return L.pack(L.normalize(encode_image(vae, pixels.to(device=device, dtype=dtype)), vae.config))


@torch.no_grad()
def encode_references(vae, refs: RefImages, device=None, dtype=None) -> RefLatents:
    """VAE-encode (mode), normalise and pack every reference; tokens are concatenated in image order."""
    if len(refs) == 0:
        return RefLatents(None, [])
    tokens = [encode_pixels(vae, px, device, dtype) for px in refs.vae_pixels]
    return RefLatents(torch.cat(tokens, dim=1), [L.token_grid(h, w) for w, h in refs.vae_sizes])
