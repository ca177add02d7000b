"""Latent layouts: the VAE's 5-D latents, the transformer's packed 2x2 tokens, and the normalisation between them.

- VAE space ("raw"): [B, 16, 1, H/8, W/8], un-normalised. This is also ComfyUI's LATENT convention for this family.
- Model space: ``(z - mean) / std`` with the 16-value lists in the VAE config, packed to [B, (H/16)(W/16), 64].
"""

from __future__ import annotations

import torch

VAE_SCALE = 8


def _stats(vae_config, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = len(vae_config["latents_mean"]) if isinstance(vae_config, dict) else len(vae_config.latents_mean)
    get = vae_config.__getitem__ if isinstance(vae_config, dict) else lambda k: getattr(vae_config, k)
    mean = torch.tensor(get("latents_mean")).view(1, z, 1, 1, 1).to(like.device, like.dtype)
    std = torch.tensor(get("latents_std")).view(1, z, 1, 1, 1).to(like.device, like.dtype)
    return mean, std


def normalize(z: torch.Tensor, vae_config) -> torch.Tensor:
    """Raw VAE latents -> model space."""
    mean, std = _stats(vae_config, z)
    return (z - mean) / std


def denormalize(z: torch.Tensor, vae_config) -> torch.Tensor:
    """Model space -> raw VAE latents (computed as the reference does: ``z / (1/std) + mean``)."""
    mean, std = _stats(vae_config, z)
    return z / (1.0 / std) + mean


def pack(z: torch.Tensor) -> torch.Tensor:
    """[B, C, 1, H, W] (or [B, 1, C, H, W] noise) -> [B, (H/2)(W/2), 4C] tokens of 2x2 patches."""
    b, h, w = z.shape[0], z.shape[3], z.shape[4]
    c = z.shape[2] if z.shape[1] == 1 else z.shape[1]
    z = z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, (H/16)(W/16), 64] tokens of an image of ``height`` x ``width`` pixels -> [B, 16, 1, H/8, W/8]."""
    b, _, ch = tokens.shape
    h, w = 2 * (height // (VAE_SCALE * 2)), 2 * (width // (VAE_SCALE * 2))
    z = tokens.view(b, h // 2, w // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return z.reshape(b, ch // 4, 1, h, w)


def token_grid(height: int, width: int) -> tuple[int, int, int]:
    """The ``img_shapes`` entry (frames, rows, cols of tokens) for an image of ``height`` x ``width`` pixels."""
    return (1, height // VAE_SCALE // 2, width // VAE_SCALE // 2)
