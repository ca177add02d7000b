"""ComfyUI's LATENT convention for this VAE family, and starting a flow from a given latent.

ComfyUI keeps Wan-2.1-VAE latents (Qwen-Image, FireRed) *raw*: un-normalised, 5-D ``[B, 16, T, H/8, W/8]`` with
``T = 1`` for images; its latent format normalises them on the way into the model. Keeping ours the same way means a
native VAE Decode gives the same picture as ours, and a native LATENT (5-D, or 4-D ``[B, 16, H/8, W/8]`` from the
image-latent nodes) can seed the sampler.
"""

from __future__ import annotations

import torch

from . import latents as L
from .errors import InputError
from .limits import require_finite

CHANNELS = 16


def check_raw(samples: torch.Tensor) -> torch.Tensor:
    """Validate a LATENT's ``samples`` and return it 5-D ``[B, 16, 1, h, w]``; raise InputError saying what is wrong."""
    if not isinstance(samples, torch.Tensor):
        raise InputError(f"expected a tensor, got {type(samples).__name__}")
    if samples.ndim == 4:
        samples = samples.unsqueeze(2)
    if samples.ndim != 5:
        raise InputError(f"expected a 4-D or 5-D latent, got shape {tuple(samples.shape)}")
    if samples.shape[1] != CHANNELS:
        raise InputError(f"this latent has {samples.shape[1]} channels; FireRed's VAE (Wan 2.1) uses {CHANNELS} "
                         "(was it made for another model family?)")
    if samples.shape[2] != 1:
        raise InputError(f"this latent has {samples.shape[2]} frames; FireRed edits single images (1 frame)")
    if samples.shape[0] == 0 or samples.shape[-1] == 0 or samples.shape[-2] == 0:
        raise InputError(f"the latent is empty (shape {tuple(samples.shape)})")
    return require_finite(samples, "the LATENT", "it would decode or sample to a black image; the node that made "
                          "it diverged")


def pixel_size(samples: torch.Tensor) -> tuple[int, int]:
    """(width, height) in pixels of a raw latent."""
    return samples.shape[-1] * L.VAE_SCALE, samples.shape[-2] * L.VAE_SCALE


def to_raw(tokens: torch.Tensor, width: int, height: int, vae_config) -> torch.Tensor:
    """Packed model-space tokens ``[B, L, 64]`` -> raw latents ``[B, 16, 1, H/8, W/8]`` (ComfyUI's LATENT)."""
    return L.denormalize(L.unpack(tokens, height, width), vae_config)


def from_raw(samples: torch.Tensor, vae_config) -> torch.Tensor:
    """Raw latents (4-D or 5-D) -> packed model-space tokens ``[B, L, 64]``."""
    return L.pack(L.normalize(check_raw(samples), vae_config))
