"""Per-image descriptors: photometric measurements, perceptual hashes, pair similarity. Pure and deterministic.

Every function takes uint8 RGB arrays and returns plain floats / strings so the scores travel as JSON between
processes (and a Ray cluster) and give identical decisions everywhere.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .extras import require
from .imageops import edge_profile, gray, periodic_ratio, resize_to, to_tensor

PHOTOMETRIC = ("brightness", "saturation", "entropy", "texture", "sharpness", "blockiness", "cast")
# the values each descriptor can take: a fitted cut-off outside them can never drop a row (reported as a problem)
RANGES = {"brightness": (0.0, 255.0), "saturation": (0.0, 1.0), "entropy": (0.0, 8.0), "texture": (0.0, None),
          "sharpness": (0.0, None), "blockiness": (0.0, None), "cast": (0.0, None)}
# fitted on a log scale: their spread grows with their level (sharpness is already log1p)
LOG_FIT = ("saturation", "texture")


def photometric(arr: np.ndarray, full: np.ndarray | None = None) -> dict[str, float]:
    """brightness (mean luma 0..255), saturation (mean HSV S 0..1), entropy (mean RGB channel entropy, bits),
    texture (mean Sobel magnitude, 0..255 scale), sharpness (log1p of the Laplacian variance on 0..255 luma),
    blockiness (JPEG 8x8 grid edge ratio, measured at full resolution on ``full``; ~1 when there is no grid),
    cast (grey world: the CIELAB a*/b* distance of the mean colour from neutral; for rows without a source).
    """
    from .pairquality import grey_world_cast

    import kornia

    t = to_tensor(arr)
    luma = kornia.color.rgb_to_grayscale(t)
    sat = kornia.color.rgb_to_hsv(t)[:, 1]
    ent = []
    for c in range(3):
        hist = np.bincount(arr[..., c].ravel(), minlength=256).astype(np.float64)
        p = hist[hist > 0] / hist.sum()
        ent.append(float(-(p * np.log2(p)).sum()))
    sobel = kornia.filters.sobel(luma * 255.0)
    lap = kornia.filters.laplacian(luma * 255.0, kernel_size=3)
    g = gray(full if full is not None else arr)[:512, :512]
    block = 0.5 * (periodic_ratio(edge_profile(g, 1), 8, 7) + periodic_ratio(edge_profile(g, 0), 8, 7))
    return {"brightness": float(luma.mean() * 255.0), "saturation": float(sat.mean()),
            "entropy": float(np.mean(ent)), "texture": float(sobel.mean()),
            "sharpness": float(lap.var().log1p()), "blockiness": block, "cast": grey_world_cast(arr)}


def perceptual_hashes(arr: np.ndarray) -> dict[str, str]:
    """64-bit pHash and dHash (the ``imagehash`` package) as hex strings."""
    imagehash = require("imagehash", "perceptual hashes (dedup / pair_check)")
    img = Image.fromarray(arr)
    return {"phash": str(imagehash.phash(img)), "dhash": str(imagehash.dhash(img))}


def hash_bits(hexes: list[str]) -> np.ndarray:
    """Hex hashes -> one uint8 0/1 vector (concatenated)."""
    return np.concatenate([np.unpackbits(np.frombuffer(bytes.fromhex(h), dtype=np.uint8)) for h in hexes])


def hash_bytes(hexes: list[str]) -> np.ndarray:
    """Hex hashes -> their bytes concatenated (uint8): the packed form the kNN search takes."""
    return np.frombuffer(b"".join(bytes.fromhex(h) for h in hexes), dtype=np.uint8)


def hamming(a: str, b: str) -> int:
    return int((hash_bits([a]) != hash_bits([b])).sum())


def psnr_ssim(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """PSNR (dB, capped at 100) and mean SSIM (11x11 window) of ``b`` against ``a``, ``b`` resized to ``a``."""
    import kornia

    b = resize_to(b, (a.shape[1], a.shape[0]))
    ta, tb = to_tensor(a), to_tensor(b)
    mse = float(((ta - tb) ** 2).mean())
    psnr = 100.0 if mse <= 1e-10 else min(100.0, float(10 * np.log10(1.0 / mse)))
    ssim = float(kornia.metrics.ssim(ta, tb, 11).mean()) if min(a.shape[:2]) >= 11 else float(psnr >= 40)
    return psnr, ssim


def thumb_diff(a: np.ndarray, b: np.ndarray, side: int = 32) -> float:
    """Largest per-pixel difference (0..255, max over channels) between side x side thumbnails: ~0-5 when nothing
    was edited (re-encoding only), tens when any region of a few percent of the picture changed."""
    ta = resize_to(a, (side, side)).astype(np.float32)
    tb = resize_to(b, (side, side)).astype(np.float32)
    return float(np.abs(ta - tb).max())


def local_change(a: np.ndarray, b: np.ndarray, window: int = 8) -> float:
    """Largest local change (0..255), ``b`` resized to ``a``: the larger of the mean absolute luma difference over
    window x window patches and the absolute mean chroma difference (RGB less luma, signed, per channel) over
    2 window x 2 window patches. Compression spreads thinly everywhere, and JPEG's chroma subsampling smears
    colour across edges without moving a patch's mean colour; an edit (recoloured even at equal luma, relit,
    moved) concentrates somewhere."""
    import torch

    b = resize_to(b, (a.shape[1], a.shape[0]))
    d = (to_tensor(a) - to_tensor(b)) * 255.0
    luma = (d * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    k = min(window, *a.shape[:2])
    k2 = min(2 * window, *a.shape[:2])
    lum = torch.nn.functional.avg_pool2d(luma.abs(), k, stride=max(1, k // 2)).max()
    chroma = torch.nn.functional.avg_pool2d(d - luma, k2, stride=max(1, k2 // 2)).abs().max()
    return float(torch.maximum(lum, chroma))


def sharpness_only(arr: np.ndarray) -> float:
    """log1p(Laplacian variance): the quality tie-break of de-duplication."""
    import kornia

    luma = kornia.color.rgb_to_grayscale(to_tensor(arr))
    return float(kornia.filters.laplacian(luma * 255.0, kernel_size=3).var().log1p())

