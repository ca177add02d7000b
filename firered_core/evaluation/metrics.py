"""Offline metrics (no judge): output vs input size, global pixel shift, quality of the region left unedited.

- ``shift``: the global translation between source and output by phase correlation (Hann window, parabolic
  sub-pixel peak), in source pixels: the known "zoom / shift" defect of edit pipelines. An output of another size is
  resized to the source size first (a zoom then shows as a size mismatch and, off-centre, as a shift).
- ``psnr_unedited`` / ``ssim_unedited``: PSNR and SSIM (kornia, 11-px Gaussian window) over the pixels that should
  not have changed: outside a given mask (white = edited), or else outside an estimate: pixels whose blurred
  difference exceeds ``threshold``, dilated, count as edited.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..registration import phase_correlate

EDIT_THRESHOLD = 0.1  # mean absolute RGB difference (0..1) above which a pixel counts as edited
MAX_SIDE = 1024  # metrics are computed at most at this size (shift reported in source pixels)


def _gray(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L"), dtype=np.float64) / 255.0


def phase_shift(source: Image.Image, output: Image.Image) -> tuple[float, float]:
    """(dx, dy) such that ``output`` ≈ ``source`` moved right by dx and down by dy (pixels of ``source``)."""
    if output.size != source.size:
        output = output.resize(source.size, Image.BICUBIC)
    dx, dy, _ = phase_correlate(torch.from_numpy(_gray(source)), torch.from_numpy(_gray(output)))
    return dx, dy


def _tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def estimate_edit_mask(source: torch.Tensor, output: torch.Tensor, threshold: float = EDIT_THRESHOLD) -> torch.Tensor:
    """[1, 1, H, W] bool: pixels whose (5-px box-blurred) mean RGB difference exceeds ``threshold``, dilated 7 px."""
    diff = (source - output).abs().mean(1, keepdim=True)
    diff = torch.nn.functional.avg_pool2d(diff, 5, stride=1, padding=2, count_include_pad=False)
    edited = (diff > threshold).float()
    return torch.nn.functional.max_pool2d(edited, 15, stride=1, padding=7) > 0


def unedited_quality(source: Image.Image, output: Image.Image, mask: Image.Image | None = None,
                     threshold: float = EDIT_THRESHOLD) -> dict:
    """PSNR (dB) and SSIM over the unedited pixels, and the fraction of pixels that counts as unedited."""
    import kornia

    if output.size != source.size:
        output = output.resize(source.size, Image.BICUBIC)
    s, o = _tensor(source), _tensor(output)
    if mask is not None:
        edited = _tensor(mask.convert("L").resize(source.size, Image.NEAREST))[:, :1] > 0.5
    else:
        edited = estimate_edit_mask(s, o, threshold)
    keep = ~edited
    fraction = float(keep.float().mean())
    if fraction == 0.0:
        return {"psnr_unedited": None, "ssim_unedited": None, "unedited_fraction": 0.0}
    mse = float(((s - o) ** 2).mean(1, keepdim=True)[keep].mean())
    psnr = math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
    ssim_map = kornia.metrics.ssim(s, o, 11).mean(1, keepdim=True)
    ssim = float(ssim_map[keep].mean())
    return {"psnr_unedited": min(psnr, 100.0), "ssim_unedited": ssim, "unedited_fraction": fraction}


@dataclass
class SampleMetrics:
    source_size: tuple[int, int]
    output_size: tuple[int, int]
    size_match: bool
    shift_dx: float
    shift_dy: float
    shift_px: float
    psnr_unedited: float | None
    ssim_unedited: float | None
    unedited_fraction: float
    mask: str  # "given" or "estimated"


def _limit(img: Image.Image, max_side: int) -> Image.Image:
    scale = max_side / max(img.size)
    if scale >= 1:
        return img
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)


def sample_metrics(source: Image.Image, output: Image.Image, mask: Image.Image | None = None,
                   threshold: float = EDIT_THRESHOLD, max_side: int = MAX_SIDE) -> SampleMetrics:
    """Every offline metric of one (source, output) pair; large pictures are measured at ``max_side``."""
    src_size, out_size = source.size, output.size
    small = _limit(source.convert("RGB"), max_side)
    scale = src_size[0] / small.width
    out_small = output.convert("RGB").resize(small.size, Image.BICUBIC)
    dx, dy = phase_shift(small, out_small)
    dx, dy = dx * scale, dy * scale
    q = unedited_quality(small, out_small, mask, threshold)
    return SampleMetrics(src_size, out_size, src_size == out_size, round(dx, 2), round(dy, 2),
                         round(math.hypot(dx, dy), 2), q["psnr_unedited"], q["ssim_unedited"],
                         q["unedited_fraction"], "given" if mask is not None else "estimated")


def metrics_dict(m: SampleMetrics) -> dict:
    d = asdict(m)
    d["source_size"], d["output_size"] = list(m.source_size), list(m.output_size)
    return d


def mask_path(masks: str | Path | None, key: str) -> Path | None:
    """``<masks>/<task>/<task>-<id>.png`` when a masks folder is given and holds one for this sample."""
    if masks is None:
        return None
    path = Path(masks) / f"{key}.png"
    return path if path.is_file() else None
