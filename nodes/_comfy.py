"""ComfyUI's own modules, imported in this one place, and the device helpers every node uses.

The pack's other ComfyUI-facing modules each hold one concern: model folders (:mod:`._folders`), progress, previews
and interrupt (:mod:`._progress`), the memory-manager adapter (:mod:`._memory`). Each falls back to plain behaviour
when ComfyUI is absent, so every node runs in tests without it. The interfaces used were checked against ComfyUI
v0.3.64 (commit a125cd84).
"""

from __future__ import annotations

import torch

try:
    import comfy.model_management as mm
    import comfy.utils as utils
    import folder_paths
except ImportError:
    mm = utils = folder_paths = None

IN_COMFY = folder_paths is not None
CHECKED_AGAINST = "ComfyUI v0.3.64 (commit a125cd84)"


def torch_device() -> torch.device:
    if IN_COMFY:
        return mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def intermediate_device() -> torch.device:
    """Where IMAGE and LATENT outputs live between nodes."""
    return mm.intermediate_device() if IN_COMFY else torch.device("cpu")


def soft_empty_cache() -> None:
    if IN_COMFY:
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def native_vae_decode(vae, samples: torch.Tensor) -> torch.Tensor:
    """Decode with ComfyUI's VAE object as its VAE Decode node does: IMAGE ``[B, H, W, C]`` (frames folded in)."""
    images = vae.decode(samples)
    if images.ndim == 5:
        images = images.reshape(-1, *images.shape[-3:])
    return images.float().clamp(0, 1)


def native_vae_encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Encode an IMAGE ``[B, H, W, 3]`` with ComfyUI's VAE object, as its VAE Encode node does (raw latent)."""
    return vae.encode(pixels)
