"""Cheap previews while sampling: the denoised estimate at each step, shown as a small RGB image.

The sampler hands each step's clean estimate ``x0 = x - sigma * v`` to its callback (``StepInfo.denoised``), so a
preview needs no extra model call. The RGB projection is linear; a host application may supply
its own factors for the Wan 2.1 latent space (ComfyUI's previewer does), otherwise the first three normalised
channels are stretched to 0..255.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from . import latents as L


def tokens_to_latent(tokens: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """First sample of packed model-space tokens -> normalised 5-D latent [1, 16, 1, h, w]."""
    return L.unpack(tokens[:1].float(), height, width)


def latent_to_rgb(z: torch.Tensor, factors: torch.Tensor | None = None, bias: torch.Tensor | None = None
                  ) -> Image.Image:
    """Normalised latent [B, 16, 1, h, w] (first sample used) -> RGB PIL image of size w x h.

    ``factors`` [16, 3] and ``bias`` [3] map latent channels to RGB in -1..1; without them the first three channels
    are min-max stretched (a neutral fallback for tests and hosts without a preview model).
    """
    x = z[0, :, 0].float().cpu().movedim(0, -1)
    if factors is not None:
        rgb = x @ factors.float() + (0 if bias is None else bias.float())
        rgb = (rgb + 1.0) / 2.0
    else:
        rgb = x[..., :3]
        lo, hi = rgb.amin(dim=(0, 1), keepdim=True), rgb.amax(dim=(0, 1), keepdim=True)
        rgb = (rgb - lo) / (hi - lo).clamp_min(1e-6)
    arr = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")
