"""Image access and the small measurements several descriptors share (numpy / kornia, single-threaded)."""

from __future__ import annotations

import contextlib
import hashlib
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from ..images import load_image


@contextlib.contextmanager
def single_thread():
    """Run torch ops on one thread: every engine then computes bit-identical scores (and workers don't fight)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@lru_cache(maxsize=4)
def load_rgb(path: str) -> np.ndarray:
    """The image as uint8 [H, W, 3] by the project's one reading rule (the last few cached per worker)."""
    arr = np.asarray(load_image(path))
    arr.setflags(write=False)
    return arr


def downscale(arr: np.ndarray, max_side: int) -> np.ndarray:
    h, w = arr.shape[:2]
    if max(h, w) <= max_side:
        return arr
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(Image.fromarray(arr).resize(size, Image.BILINEAR))


def resize_to(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to (width, height) exactly (no-op when already there)."""
    if (arr.shape[1], arr.shape[0]) == tuple(size):
        return arr
    return np.asarray(Image.fromarray(arr).resize(size, Image.BILINEAR))


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [1, 3, H, W] in 0..1."""
    return torch.from_numpy(np.array(arr, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0


def gray(arr: np.ndarray) -> np.ndarray:
    return (arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114).astype(np.float32)


def pixel_hash(arr: np.ndarray) -> str:
    """Exact content hash of the decoded pixels (the same picture saved as PNG and as BMP hashes alike)."""
    h = hashlib.sha256(f"{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:32]


def edge_profile(g: np.ndarray, axis: int) -> np.ndarray:
    """Mean absolute difference between neighbouring columns (axis=1) or rows (axis=0): length W-1 or H-1."""
    return np.abs(np.diff(g, axis=axis)).mean(axis=1 - axis)


def periodic_ratio(profile: np.ndarray, period: int, phase: int | None = None, eps: float = 1.0) -> float:
    """How much the edge energy concentrates on every ``period``-th boundary: boundary mean / (interior mean + eps).

    ``phase`` fixes where the boundaries are (JPEG: 7, the grid starts at the origin); None takes the best phase
    (a mosaic may start anywhere). About 1 for natural images; large for block grids.
    """
    n = len(profile) // period * period
    if n < 2 * period:
        return 1.0
    cols = profile[:n].reshape(-1, period)
    on = cols.mean(axis=0)  # boundary mean for each phase
    off = (cols.sum() - cols.sum(axis=0)) / (n - n // period)
    ratio = on / (off + eps)
    return float(ratio[phase] if phase is not None else ratio.max())
