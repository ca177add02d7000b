"""Binary morphology on [H, W] bool maps: dilate, erode, open / close, geodesic reconstruction (hysteresis, hole
filling) and connected components.

Plain torch (label propagation) always works; when SciPy is installed (ComfyUI installs it) its ``ndimage`` does the
propagating steps much faster, with the same results (``tests/test_preserve.py`` compares the two).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from scipy import ndimage
except ImportError:  # pragma: no cover - plain torch then
    ndimage = None

CHECK_EVERY = 8  # propagation steps between convergence checks
EIGHT = [[1, 1, 1], [1, 1, 1], [1, 1, 1]]
FORCE_TORCH = False  # tests set it to compare the two paths


def _disk(radius: int) -> torch.Tensor:
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    return ((r[:, None] ** 2 + r[None] ** 2) <= radius * radius + radius).float()


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Dilation by a disk of ``radius`` pixels (0 = unchanged)."""
    if radius <= 0:
        return mask
    k = _disk(radius)[None, None]
    hit = F.conv2d(mask.float()[None, None], k, padding=radius)[0, 0]
    return hit > 0.5


def erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Erosion by a disk; the picture's border does not count as background."""
    if radius <= 0:
        return mask
    k = _disk(radius)[None, None]
    miss = F.conv2d((~mask).float()[None, None], k, padding=radius)[0, 0]
    return miss < 0.5


def close(mask: torch.Tensor, radius: int) -> torch.Tensor:
    return erode(dilate(mask, radius), radius)


def open_(mask: torch.Tensor, radius: int) -> torch.Tensor:
    return dilate(erode(mask, radius), radius)


def _spread_max(values: torch.Tensor, within: torch.Tensor) -> torch.Tensor:
    """Spread the largest value over each 8-connected region of ``within`` (1 inside, 0 outside) until nothing
    changes: the torch path of reconstruction and labelling."""
    cur, lim = values[None, None], within[None, None]
    while True:
        prev = cur
        for _ in range(CHECK_EVERY):
            cur = F.max_pool2d(cur, 3, stride=1, padding=1) * lim
        if torch.equal(cur, prev):
            return cur[0, 0]


def reconstruct(seed: torch.Tensor, within: torch.Tensor) -> torch.Tensor:
    """Every pixel of ``within`` 8-connected to a pixel of ``seed & within`` (morphological reconstruction)."""
    if ndimage is not None and not FORCE_TORCH:
        out = ndimage.binary_propagation((seed & within).numpy(), structure=EIGHT, mask=within.numpy())
        return torch.from_numpy(out)
    return _spread_max((seed & within).float(), within.float()) > 0


def fill_holes(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` plus every background region that does not touch the picture's border."""
    border = torch.zeros_like(mask)
    border[0, :] = border[-1, :] = True
    border[:, 0] = border[:, -1] = True
    outside = reconstruct(border, ~mask)
    return ~outside


def components(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-connected components: a label map [H, W] (0 = background, labels not consecutive) and each label's
    pixel count (indexed by label)."""
    h, w = mask.shape
    if ndimage is not None and not FORCE_TORCH:
        labels = torch.from_numpy(ndimage.label(mask.numpy(), structure=EIGHT)[0]).long()
        return labels, torch.bincount(labels.view(-1))
    start = torch.arange(1, h * w + 1, dtype=torch.float64).view(h, w) * mask.double()
    labels = _spread_max(start, mask.double()).long()
    return labels, torch.bincount(labels.view(-1), minlength=h * w + 1)


def remove_small(mask: torch.Tensor, min_area: int) -> torch.Tensor:
    """``mask`` without its components smaller than ``min_area`` pixels."""
    if min_area <= 1 or not bool(mask.any()):
        return mask
    labels, counts = components(mask)
    keep = counts >= min_area
    keep[0] = False
    return keep[labels]
