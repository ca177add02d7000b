"""Edits confined to a mask: the resize rule, per-step latent blending, the exact composite and colour match.

Convention (ComfyUI's): a mask is float in 0..1, 1 = may change, 0 = keep; grey = partially editable.

1. **Resize rule.** A mask of another size than its image is stretched to the image's width and height (bilinear,
   antialiased when shrinking, as ComfyUI stretches a mask onto a latent), then clamped to 0..1 (values within 1e-4
   of 0 or 1 snapped to them). A mask file is
   read as ``1 - alpha`` when it has transparency (what ComfyUI's mask editor writes; LoadImage's convention),
   else as its luminance (white = edit).
2. **Latent blending.** The mask is max-pooled onto the 16x16-pixel token grid (a token touching the mask may
   change). After every sampling step, a token whose mask value ``m`` is at most the new noise level ``sigma`` is
   put back on the source's noised trajectory ``sigma * noise + (1 - sigma) * source``; once ``sigma < m`` it is
   free. So white (1) is edited at every step, black (0) follows the source to the end, and grey ``m`` is edited
   like a partial denoise of strength ``m`` (a differential-strength schedule).
3. **Composite.** The decoded result is composited onto the source at the source's size:
   ``alpha = m * ramp``, where ``ramp`` rises from 0 at the mask's border to 1 ``feather`` pixels inside; every pixel
   with ``alpha == 0`` (everything outside the mask) is the source's own value, bit for bit.
4. **Colour match** (optional): the edit's colour drift is measured where the result should equal the source
   (outside the mask) and undone on the whole result before compositing: mean and standard deviation per channel
   in CIE Lab (``mean-std``), or per-channel quantile mapping in RGB (``histogram``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .errors import FireRedError
from .sampling import StepHook, noised_start

log = logging.getLogger(__name__)

COLOR_MATCH = ("off", "mean-std", "histogram")
TOKEN_PIXELS = 16  # one packed token covers 16 x 16 pixels (VAE 8x, 2x2 patch)
MIN_OUTSIDE_PIXELS = 64
SNAP = 1e-4  # resized mask values this close to 0 or 1 are 0 or 1


class MaskError(FireRedError):
    """A mask that cannot be used (unreadable, wrong shape, a batch that does not fit)."""


def as_mask(mask: torch.Tensor | np.ndarray | Image.Image) -> torch.Tensor:
    """Any mask (PIL image, [H, W], [B, H, W] or [B, 1, H, W], 0..1) -> float32 [B, H, W] clamped to 0..1."""
    if isinstance(mask, Image.Image):
        return mask_from_pil(mask)
    t = torch.as_tensor(mask).float()
    if t.dim() == 4 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3 or 0 in t.shape:
        raise MaskError(f"a mask must be [height, width] or [batch, height, width], got shape {tuple(t.shape)}")
    return t.clamp(0, 1)


def mask_from_pil(img: Image.Image) -> torch.Tensor:
    """A mask picture -> [1, H, W]: ``1 - alpha`` if it has transparency (ComfyUI's mask editor), else luminance."""
    img = ImageOps.exif_transpose(img) or img
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        alpha = np.asarray(img.convert("RGBA"), dtype=np.float32)[..., 3] / 255.0
        if alpha.min() < 1.0:
            return torch.from_numpy(1.0 - alpha)[None]
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        from .images import to_rgb

        img = to_rgb(img)
    return torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32) / 255.0)[None]


def load_mask(path: str | Path) -> torch.Tensor:
    """Read a mask file by the module's rule; raise :class:`MaskError` naming the file on failure."""
    from .images import open_image

    return mask_from_pil(open_image(path, MaskError, "mask"))


def resize_mask(mask: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Stretch a [B, H, W] mask to ``width`` x ``height`` (bilinear, antialiased when shrinking), clamped to 0..1."""
    mask = as_mask(mask)
    if (mask.shape[2], mask.shape[1]) == (width, height):
        return mask
    shrink = width < mask.shape[2] or height < mask.shape[1]
    out = F.interpolate(mask[:, None], size=(height, width), mode="bilinear", align_corners=False, antialias=shrink)
    out = out[:, 0].clamp(0, 1)
    # float round-off of the filter must not turn "keep" into "barely change" (or "edit" into "almost edit")
    return torch.where(out < SNAP, 0.0, torch.where(out > 1 - SNAP, 1.0, out))


def resize_image(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[B, H, W, C] in 0..1 -> ``width`` x ``height`` (bicubic, antialiased); unchanged when already that size."""
    if (image.shape[2], image.shape[1]) == (width, height):
        return image
    chw = F.interpolate(image.permute(0, 3, 1, 2), size=(height, width), mode="bicubic", align_corners=False,
                        antialias=True)
    return chw.permute(0, 2, 3, 1).clamp(0, 1)


EMPTY_MASK_WARNING = ("{where}: the mask is all zero, so nothing may change and the output will equal the input; "
                      "paint the region to edit (in ComfyUI: right-click the picture > Open in MaskEditor)")


def warn_if_empty(mask: torch.Tensor, where: str) -> bool:
    """Log a warning (and return True) when ``mask`` marks nothing to edit: a whole run would give back its input
    without a word (LoadImage's mask of a picture nobody painted is all zero)."""
    empty = not bool((as_mask(mask) > 0).any())
    if empty:
        log.warning(EMPTY_MASK_WARNING.format(where=where))
    return empty


def fit_batch(mask: torch.Tensor, batch: int, what: str = "mask") -> torch.Tensor:
    """One mask for the whole batch, or one per image; anything else is an error."""
    if mask.shape[0] == batch:
        return mask
    if mask.shape[0] == 1:
        return mask.expand(batch, *mask.shape[1:])
    raise MaskError(f"the {what} holds {mask.shape[0]} masks for {batch} images; give one mask or one per image")


def token_mask(mask: torch.Tensor) -> torch.Tensor:
    """A [B, H, W] mask at the generation size (multiples of 16) -> [B, tokens, 1], max over each token's pixels."""
    b, h, w = mask.shape
    if h % TOKEN_PIXELS or w % TOKEN_PIXELS:
        raise MaskError(f"mask {w}x{h} is not at a generation size (multiples of {TOKEN_PIXELS})")
    pooled = F.max_pool2d(mask[:, None].float(), TOKEN_PIXELS)
    return pooled.reshape(b, -1, 1)


def blend_hook(source: torch.Tensor, tokens: torch.Tensor) -> Callable[[torch.Tensor], StepHook]:
    """The per-step latent blend for :func:`firered_core.pipeline.denoise_latents`.

    ``source`` are the source's packed model-space latents [1 or B, L, 64] at the generation size and ``tokens``
    the mask per token [1 or B, L, 1]. Given the starting noise, returns the hook that puts every token with
    ``mask <= sigma`` back on the source's noised trajectory after each step.
    """
    def for_noise(noise: torch.Tensor) -> StepHook:
        src = source.to(noise.device, noise.dtype)
        m = tokens.to(noise.device, torch.float32)

        def hook(step: int, sigma: float, latents: torch.Tensor) -> torch.Tensor:
            held = m <= sigma
            return torch.where(held, noised_start(src, noise, sigma), latents)
        return hook
    return for_noise


def _erode(x: torch.Tensor) -> torch.Tensor:
    """3x3 minimum; the image border does not count as outside."""
    return -F.max_pool2d(-x, 3, stride=1, padding=1)


def feather_alpha(mask: torch.Tensor, feather: int) -> torch.Tensor:
    """[B, H, W] compositing weights: the mask times a ramp from 0 at its border to 1 ``feather`` pixels inside.

    Zero wherever the mask is zero, so the composite leaves those pixels untouched.
    """
    if feather < 0:
        raise MaskError(f"feather={feather} must be >= 0 pixels")
    if feather == 0:
        return mask
    inside = (mask > 0).float()[:, None]
    ramp, level = torch.zeros_like(inside), inside
    for _ in range(feather):
        ramp += level
        level = _erode(level)
    return mask * (ramp[:, 0] / feather)


def composite(edited: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, feather: int = 0) -> torch.Tensor:
    """Put ``edited`` [B, H, W, C] onto ``source`` [1 or B, H, W, C] through ``mask`` [1 or B, H, W].

    Pixels where the (feathered) mask is 0 are copied from ``source`` exactly.
    """
    b, h, w, _ = edited.shape
    if source.shape[1:3] != (h, w):
        raise MaskError(f"the source is {source.shape[2]}x{source.shape[1]} but the edit is {w}x{h}")
    mask = fit_batch(resize_mask(mask, w, h), b)
    alpha = feather_alpha(mask, feather)[..., None].to(edited.dtype)
    source = source.to(edited.dtype).expand(b, -1, -1, -1)
    return torch.where(alpha > 0, source * (1 - alpha) + edited * alpha, source)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation (numpy's ``interp``) for 1-D increasing ``xp``."""
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp) - 1)
    x0, x1, y0, y1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    t = ((x - x0) / (x1 - x0).clamp_min(1e-12)).clamp(0, 1)
    return y0 + t * (y1 - y0)


def _match_mean_std(edited: torch.Tensor, source: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    import kornia

    lab_e = kornia.color.rgb_to_lab(edited.permute(2, 0, 1)[None])[0].reshape(3, -1)
    lab_s = kornia.color.rgb_to_lab(source.permute(2, 0, 1)[None])[0].reshape(3, -1)
    sel = outside.reshape(-1)
    mu_e, sd_e = lab_e[:, sel].mean(1, keepdim=True), lab_e[:, sel].std(1, keepdim=True).clamp_min(1e-4)
    mu_s, sd_s = lab_s[:, sel].mean(1, keepdim=True), lab_s[:, sel].std(1, keepdim=True)
    lab = ((lab_e - mu_e) / sd_e * sd_s + mu_s).reshape(3, *edited.shape[:2])
    return kornia.color.lab_to_rgb(lab[None], clip=True)[0].permute(1, 2, 0)


def _match_histogram(edited: torch.Tensor, source: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    q = torch.linspace(0, 1, 257, dtype=torch.float32)
    out = torch.empty_like(edited)
    for c in range(edited.shape[-1]):
        e_out, s_out = edited[..., c][outside].float(), source[..., c][outside].float()
        e_q, s_q = torch.quantile(e_out, q), torch.quantile(s_out, q)
        e_q = e_q + torch.arange(len(q)) * 1e-7  # strictly increasing for the search
        out[..., c] = _interp(edited[..., c].reshape(-1).float(), e_q, s_q).reshape(edited.shape[:2])
    return out


def color_match(edited: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, method: str = "mean-std"
                ) -> torch.Tensor:
    """Undo the colour drift of ``edited`` [B, H, W, 3] measured against ``source`` where ``mask`` is 0.

    ``method``: ``off``, ``mean-std`` (per-channel mean and std in CIE Lab) or ``histogram`` (per-channel quantile
    mapping in RGB). With fewer than 64 pixels outside the mask there is nothing to measure: unchanged, with a
    warning.
    """
    if method not in COLOR_MATCH:
        raise MaskError(f"colour match {method!r} is not one of {COLOR_MATCH}")
    if method == "off":
        return edited
    b, h, w, _ = edited.shape
    mask = fit_batch(resize_mask(mask, w, h), b)
    source = source.expand(b, -1, -1, -1)
    match = _match_mean_std if method == "mean-std" else _match_histogram
    out = []
    for k in range(b):
        outside = mask[k] == 0
        if int(outside.sum()) < MIN_OUTSIDE_PIXELS:
            log.warning("colour match skipped: fewer than %d pixels outside the mask", MIN_OUTSIDE_PIXELS)
            out.append(edited[k])
            continue
        out.append(match(edited[k].float(), source[k].float(), outside).clamp(0, 1).to(edited.dtype))
    return torch.stack(out)


def finish(edited: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, feather: int = 0,
           color: str = "off") -> torch.Tensor:
    """The last stage of a masked edit at the source's size: optional colour match, then the exact composite."""
    return composite(color_match(edited, source, mask, color), source, mask, feather)
