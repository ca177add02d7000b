"""Planted edits on real photographs: the proof material of :mod:`firered_core.preserve`.

The photographs are the ones scikit-image ships in its wheel (no download), split by a fixed rule (alphabetical
order, alternate) into a TUNING half and a HELD-OUT half. A planted case is what an instruction editor returns:

1. a local change inside a random blob covering 2-40 % of the picture (a shaded object, a patch of another
   photograph, or a recolouring), blended over ~1 px; the blob is the truth;
2. a global colour drift (per channel gain 0.92-1.08, offset ±0.04, gamma 0.9-1.1);
3. a global shift of 0-3 px, a zoom of 0-2 %, or both;
4. VAE round-trip noise: the tiny random VAE (``demo_models``) encodes and decodes the picture; its random weights
   return structured noise (8-px correlated, not the picture), which is scaled to a PSNR of 30-36 dB and added,
   together with a loss of fine detail (part of the picture minus its 1-px blur) as a trained VAE loses it;
5. 8-bit rounding.

Needs scikit-image (``[dev]``); nothing here is imported by the library itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..registration import Registration, warp

PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "moon", "motorcycle", "page", "retina", "rocket", "text")
TUNING = PHOTOS[0::2]
HELD_OUT = PHOTOS[1::2]
GEOMETRY = ("shift", "zoom", "both")
KINDS = ("object", "paste", "recolour")
# Held-out draws: seeds 0, 1 and 7, then 11-13 (declared 2026-12-07 19:40 UTC, looked at twice), then 21-25 and 26
# (declared 21:58 and 23:10 UTC, looked at once, then used to diagnose the colour map's ridge), then 31-36 (declared
# 23:28 UTC, evaluated once at the end of round 3), then 41-46 (declared 2026-12-08 00:27 UTC, commit 494e899,
# evaluated once at the end of round 4), then 51-56 (declared 01:41 UTC, commit d80c01e, evaluated once at the end
# of round 5), then 61-66 (declared 02:55 UTC, commit 568799a, evaluated once at the end of round 6) of HELD_OUT
# have been looked at. The draw below was declared (04:10 UTC, commit ba63271) before round 7 (the colour fit's
# detail term) changed the estimator, and evaluated once at its end (04:29 UTC): FRESH_SEEDS for the benchmark
# (4 draws x 3 cases per photograph at 192 px), TEST_SEED for the CI test, LARGE_SEED at 384 px, on the HELD_OUT
# photographs (never used for tuning). A further round declares a new draw (81 on) here, and commits it, before it
# changes the estimator.
# Tuning runs only on TUNING (any seed), on tiled textures made from TUNING photographs (analogue_cases) and on hazy
# TUNING photographs (hazy_cases).
LOOKED_AT_SEEDS = (0, 1, 7, 11, 12, 13, 21, 22, 23, 24, 25, 26, 31, 32, 33, 34, 35, 36, 41, 42, 43, 44, 45, 46,
                   51, 52, 53, 54, 55, 56, 61, 62, 63, 64, 65, 66)
FRESH_SEEDS = (71, 72, 73, 74)
TEST_SEED = 75
LARGE_SEED = 76  # a 384 px draw: 2 cases per HELD_OUT photograph


@lru_cache(maxsize=None)
def _photo_array(name: str) -> np.ndarray:
    import skimage.data

    arr = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, -1)
    return np.ascontiguousarray(arr[..., :3])


def photo(name: str, side: int) -> torch.Tensor:
    """Photograph ``name`` as [H, W, 3] in 0..1 (8-bit values), its longer side ``side`` (antialiased)."""
    arr = torch.from_numpy(_photo_array(name)).float().permute(2, 0, 1)[None] / 255.0
    h, w = arr.shape[2:]
    f = side / max(h, w)
    size = (max(16, round(h * f)), max(16, round(w * f)))
    out = F.interpolate(arr, size=size, mode="bilinear", antialias=True, align_corners=False)
    return quantize(out[0].permute(1, 2, 0))


def tiled(name: str, side: int, crop: int = 64) -> torch.Tensor:
    """A ``side`` x ``side`` periodic texture: the centre ``crop`` x ``crop`` px of photograph ``name`` (at 512 px)
    repeated; the tuning-side stand-in for the held-out half's strong periodic textures (brick, cell)."""
    image = photo(name, 512)
    h, w = image.shape[:2]
    patch = image[(h - crop) // 2:(h + crop) // 2, (w - crop) // 2:(w + crop) // 2]
    reps = side // crop + 1
    return patch.repeat(reps, reps, 1)[:side, :side].contiguous()


ANALOGUE_PHOTOS = ("coffee", "chelsea", "astronaut", "rocket", "grass", "camera")
ANALOGUE_CROPS = (24, 32, 48, 64)


def analogue_cases(side: int, per_photo: int, seed: int = 0) -> list[PlantedCase]:
    """Tuning-side stand-ins for the held-out half's periodic textures: ``per_photo`` cases on each TUNING photograph
    of :data:`ANALOGUE_PHOTOS` tiled (crop 24-64 px by seed and photograph; grass as it is), content pasted from the
    next one in the list."""
    out = []
    for i, name in enumerate(ANALOGUE_PHOTOS):
        crop = ANALOGUE_CROPS[(seed + i) % len(ANALOGUE_CROPS)]
        src = photo(name, side) if name == "grass" else tiled(name, side, crop)
        other = photo(ANALOGUE_PHOTOS[(i + 1) % len(ANALOGUE_PHOTOS)], side)
        out.extend(plant(name, src, other, seed=seed * 1000 + i * 37 + k) for k in range(per_photo))
    return out


def hazy(name: str, side: int, sigma: float, contrast: float) -> torch.Tensor:
    """Photograph ``name`` blurred by ``sigma`` px (Gaussian, at 512 px) and its contrast scaled by ``contrast`` about
    its mean, then reduced to ``side``: the tuning-side stand-in for a picture with little structure (a blurred,
    hazy or low-contrast photograph; the held-out clock's gradients are a seventh of the TUNING half's median)."""
    image = _blur(photo(name, 512), sigma)
    mean = image.mean((0, 1))
    image = (image - mean) * contrast + mean
    h, w = image.shape[:2]
    f = side / max(h, w)
    out = F.interpolate(image.permute(2, 0, 1)[None], size=(round(h * f), round(w * f)), mode="bilinear",
                        antialias=True, align_corners=False)
    return quantize(out[0].permute(1, 2, 0))


def hazy_cases(side: int, per_photo: int, seed: int = 0) -> list[PlantedCase]:
    """``per_photo`` planted cases on each TUNING photograph made :func:`hazy` (sigma 6-14 px, contrast 0.4-0.9,
    drawn from ``seed``), content pasted from the next photograph as it is."""
    rng = np.random.default_rng(seed + 999)
    out = []
    for i, name in enumerate(TUNING):
        src = hazy(name, side, float(rng.uniform(6, 14)), float(rng.uniform(0.4, 0.9)))
        other = photo(TUNING[(i + 1) % len(TUNING)], side)
        out.extend(plant(name, src, other, seed=seed * 1000 + i * 37 + k) for k in range(per_photo))
    return out


def quantize(image: torch.Tensor) -> torch.Tensor:
    return (image.clamp(0, 1) * 255).round() / 255


def blob(height: int, width: int, fraction: float, rng: np.random.Generator) -> torch.Tensor:
    """A random smooth blob (bool [H, W]) covering about ``fraction`` of the picture."""
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                          indexing="ij")
    aspect = float(rng.uniform(0.6, 1.6))
    angle = float(rng.uniform(0, math.pi))
    waves = [(k, float(rng.uniform(-0.15, 0.15)), float(rng.uniform(0, 2 * math.pi))) for k in (2, 3, 4)]
    r0 = math.sqrt(fraction * height * width / math.pi)
    margin = 0.6 * r0 * max(aspect, 1 / aspect)
    cy = float(rng.uniform(min(margin, height / 2), max(height - margin, height / 2)))
    cx = float(rng.uniform(min(margin, width / 2), max(width - margin, width / 2)))
    for _ in range(3):
        dy, dx = y - cy, x - cx
        u = (dx * math.cos(angle) + dy * math.sin(angle)) / math.sqrt(aspect)
        v = (-dx * math.sin(angle) + dy * math.cos(angle)) * math.sqrt(aspect)
        theta = torch.atan2(v, u)
        radius = r0 * (1 + sum(a * torch.sin(k * theta + p) for k, a, p in waves))
        region = (u * u + v * v).sqrt() <= radius
        got = float(region.double().mean())
        r0 *= math.sqrt(fraction / max(got, 1e-4))
    return region


def _blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(image.dtype)
    chw = image.permute(2, 0, 1)[:, None] if image.dim() == 3 else image[None, None]
    chw = F.conv2d(F.pad(chw, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    chw = F.conv2d(F.pad(chw, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return chw[:, 0].permute(1, 2, 0) if image.dim() == 3 else chw[0, 0]


def _far_colour(mean: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    c = 1.0 - mean
    c = (c - c.mean()) * 2.0 + c.mean() + torch.from_numpy(rng.uniform(-0.15, 0.15, 3)).float()
    return c.clamp(0.05, 0.95)


def local_change(source: torch.Tensor, region: torch.Tensor, kind: str, other: torch.Tensor,
                 rng: np.random.Generator) -> torch.Tensor:
    """``source`` with ``region`` replaced by new content of ``kind``, blended over ~1 px."""
    h, w = region.shape
    mean = source[region].mean(0)
    colour = _far_colour(mean, rng)
    other = F.interpolate(other.permute(2, 0, 1)[None], size=(h, w), mode="bilinear", align_corners=False,
                          antialias=True)[0].permute(1, 2, 0)
    if kind == "object":
        ys = torch.linspace(-1, 1, h)[:, None, None]
        shade = 1 + 0.25 * ys * float(rng.choice([-1, 1]))
        content = colour * shade + 0.15 * (other - other.mean())
    elif kind == "paste":
        content = 0.55 * other + 0.45 * colour
    else:
        content = 0.6 * (1 - source) + 0.4 * colour
    alpha = _blur(region.float(), 0.7)[..., None]
    return (source * (1 - alpha) + content.clamp(0, 1) * alpha).clamp(0, 1)


def colour_drift(image: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
    gain = torch.from_numpy(rng.uniform(0.92, 1.08, 3)).float()
    offset = torch.from_numpy(rng.uniform(-0.04, 0.04, 3)).float()
    gamma = torch.from_numpy(rng.uniform(0.9, 1.1, 3)).float()
    return (gain * image.clamp(0, 1) ** gamma + offset).clamp(0, 1), {"gain": gain.tolist(), "offset": offset.tolist()}


def move(image: torch.Tensor, dx: float, dy: float, scale: float) -> torch.Tensor:
    """The picture as an editor that shifted it by (dx, dy) and zoomed it by ``scale`` would return it."""
    h, w = image.shape[:2]
    out, _ = warp(image, Registration(-dx / scale, -dy / scale, 1 / scale), h, w)
    return out


@lru_cache(maxsize=1)
def tiny_vae():
    """The tiny demo model's VAE (random weights, seeded as ``demo_models.build_components`` seeds it)."""
    from diffusers import AutoencoderKLQwenImage

    from ..demo_models import vae_config

    torch.manual_seed(1)
    return AutoencoderKLQwenImage(**vae_config("tiny")).eval()


@torch.no_grad()
def vae_noise(image: torch.Tensor) -> torch.Tensor:
    """The tiny VAE's round trip of ``image`` minus its mean, scaled to unit standard deviation ([H, W, 3])."""
    h, w = image.shape[:2]
    ph, pw = (-h) % 16, (-w) % 16
    x = F.pad(image.permute(2, 0, 1)[None], (0, pw, 0, ph), mode="replicate") * 2 - 1
    vae = tiny_vae()
    y = vae.decode(vae.encode(x[:, :, None]).latent_dist.mode()).sample[0, :, 0, :h, :w].permute(1, 2, 0)
    y = y - y.mean((0, 1))
    return y / y.std().clamp_min(1e-6)


def vae_round_trip(image: torch.Tensor, psnr: float, detail_loss: float) -> torch.Tensor:
    """Detail loss plus the tiny VAE's structured noise at ``psnr`` dB (noise RMS = 10^(-psnr/20))."""
    soft = image - detail_loss * (image - _blur(image, 1.0))
    return (soft + 10 ** (-psnr / 20) * vae_noise(image)).clamp(0, 1)


@dataclass
class PlantedCase:
    name: str
    source: torch.Tensor  # [H, W, 3], 8-bit values
    edited: torch.Tensor  # [H, W, 3], 8-bit values
    region: torch.Tensor  # bool [H, W]: the planted change, in the source's frame
    params: dict


def plant(name: str, source: torch.Tensor, other: torch.Tensor, seed: int, fraction: float | None = None,
          geometry: str | None = None, kind: str | None = None) -> PlantedCase:
    """One planted case on ``source`` (``other`` supplies pasted content); everything random comes from ``seed``."""
    rng = np.random.default_rng(seed)
    h, w = source.shape[:2]
    fraction = float(rng.uniform(0.02, 0.40)) if fraction is None else fraction
    geometry = GEOMETRY[int(rng.integers(3))] if geometry is None else geometry
    kind = KINDS[int(rng.integers(3))] if kind is None else kind
    region = blob(h, w, fraction, rng)
    edited = local_change(source, region, kind, other, rng)
    change = float((edited - source).norm(dim=-1)[region].median()) if bool(region.any()) else 0.0
    edited, drift = colour_drift(edited, rng)
    dx = dy = 0.0
    scale = 1.0
    if geometry in ("shift", "both"):
        dx, dy = (float(v) for v in rng.uniform(-3, 3, 2))
    if geometry in ("zoom", "both"):
        scale = float(rng.uniform(1.0, 1.02))
    edited = move(edited, dx, dy, scale)
    psnr, loss = float(rng.uniform(30, 36)), float(rng.uniform(0.2, 0.5))
    edited = quantize(vae_round_trip(edited, psnr, loss))
    params = {"fraction": round(float(region.float().mean()), 3), "kind": kind, "geometry": geometry,
              "dx": round(dx, 2), "dy": round(dy, 2), "zoom": round(scale, 4), "psnr": round(psnr, 1),
              "change": round(change, 3), **drift}
    return PlantedCase(name, source, edited, region, params)


def cases(names: tuple[str, ...], side: int, per_photo: int, seed: int = 0) -> list[PlantedCase]:
    """``per_photo`` planted cases on each photograph of ``names`` (content pasted from the next one in the list)."""
    out = []
    for i, name in enumerate(names):
        src, other = photo(name, side), photo(names[(i + 1) % len(names)], side)
        for k in range(per_photo):
            out.append(plant(name, src, other, seed=seed * 1000 + i * 37 + k))
    return out


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def to_8bit(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1).numpy() * 255).round().astype(np.uint8)


class PlantedEditor:
    """Stands in for :class:`~firered_core.pipeline.EditPipeline` in edit chains: round ``seed``'s "model" changes a
    blob (``fraction`` of the picture, at a place drawn from the seed), drifts the colours, shifts / zooms and adds
    tiny-VAE noise to the whole picture, as :func:`plant` does; ``preserve="auto"`` then runs the real
    :func:`~firered_core.preserve.preserve_batch`, as the pipeline does."""

    def __init__(self, other: torch.Tensor, fraction: float = 0.03):
        self.other, self.fraction = other, fraction

    def edit(self, images, prompt, seed: int = 0, preserve: str = "off", reference_latent=None, **kwargs):
        from ..images import pil_to_tensor, tensor_to_pil
        from ..pipeline import EditResult
        from ..preserve import preserve_batch

        src = pil_to_tensor(images[-1])
        case = plant("chain", src, self.other, seed=seed, fraction=self.fraction, kind="object")
        masks, notes = None, []
        out = case.edited[None]
        if preserve == "auto":
            out, masks, notes = preserve_batch(src[None], out)
        h, w = src.shape[:2]
        return EditResult([tensor_to_pil(out[0])], None, w, h, None, masks, notes)
