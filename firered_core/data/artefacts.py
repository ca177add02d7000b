"""Artefact heuristics on one image: overlay text / watermarks, mosaic (pixelation), collage borders, QR codes and
barcodes. Each returns a plain score; the thresholds live in the stage config (ArtefactConfig)."""

from __future__ import annotations

import numpy as np

from .extras import require
from .imageops import edge_profile, gray, periodic_ratio


Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels of the array measured


def text_score(arr: np.ndarray) -> float:
    return text_find(arr)[0]


def _strokes(cv2, g: np.ndarray, op, level: float = 40) -> np.ndarray:
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (9, 9))
    return (cv2.morphologyEx(g, op, kernel) > level).astype(np.uint8)


def text_find(arr: np.ndarray, ref: np.ndarray | None = None) -> tuple[float, Box | None]:
    """Overlay text: thin high-contrast strokes (top-hat / black-hat) joined into line blobs; the score is the most
    stroke crossings along one blob's scan lines (shape edges cross 1-4 times; a word of text 8 or more), and the
    box is that blob's. With ``ref`` (the row's source, resized to ``arr``) a stroke must show both in the
    difference target - source (on mid grey; a photograph's own fine texture cancels, an overlay stays) and, with
    the same polarity, in the target itself (texture an edit covered shows in the difference only, inverted). Both
    masks are then lower (24 and 12 levels): outside the edit the difference is only re-encoding noise, so a
    half-transparent watermark over a bright wall is still seen. A pair is also read through the overlay's own
    model (:func:`_overlay_alpha`), and the higher score of the two wins."""
    cv2 = require("cv2", "the overlay-text / watermark detector (artefacts.text)")
    own = np.clip(gray(arr), 0, 255).astype(np.uint8)
    g = own if ref is None else np.clip(128.0 + gray(arr) - gray(ref), 0, 255).astype(np.uint8)
    best: tuple[float, Box | None] = (0, None)
    for op in (cv2.MORPH_TOPHAT, cv2.MORPH_BLACKHAT):  # light text, dark text: one polarity at a time
        mask = _strokes(cv2, g, op) if ref is None else _strokes(cv2, g, op, 24) & _strokes(cv2, own, op, 12)
        best = _best_line(cv2, mask, best)
    if ref is not None:
        for light in (True, False):
            best = _best_line(cv2, _strokes(cv2, _overlay_alpha(arr, ref, light), cv2.MORPH_TOPHAT, 80), best)
    return float(best[0]), best[1]


def _overlay_alpha(arr: np.ndarray, ref: np.ndarray, light: bool, floor: float = 32.0,
                   least: float = 4.0) -> np.ndarray:
    """The opacity a light (white) or dark (black) overlay would need to turn the source into the target, per pixel,
    as 0..255. A semi-transparent watermark of opacity a raises a pixel s to s + a (255 - s): the difference alone
    shrinks with the room left above s (a 0.35 watermark over a bright wall moves it a few levels), while the
    opacity is the same over dark and bright ground, so its strokes stand out evenly. The room is floored at
    ``floor`` levels (no division by a blown sky) and differences under ``least`` levels (re-encoding) count 0."""
    d = gray(arr).astype(np.float64) - gray(ref)
    s = gray(ref).astype(np.float64)
    d, room = (d, 255.0 - s) if light else (-d, s)
    a = np.where(d > least, np.clip(d / np.maximum(room, floor), 0, 1), 0.0)
    return np.round(a * 255).astype(np.uint8)


def _best_line(cv2, mask: np.ndarray, best: tuple[float, Box | None]) -> tuple[float, Box | None]:
    """The stroke mask's text lines (the mask dilated along rows into blobs at least 6 px high, wider than high,
    off the border where morphology has edges) and the most stroke crossings along one of their scan lines, if
    more than ``best``'s."""
    lines = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_RECT, (7, 1)))
    n, _, stats, _ = cv2.connectedComponentsWithStats(lines, connectivity=8)
    for i in range(1, n):
        x, y, w, h, _ = stats[i]
        if not (6 <= h <= 48 and w >= 1.5 * h) or y == 0 or y + h == mask.shape[0]:
            continue
        box = mask[y:y + h, x:x + w]
        for frac in (0.35, 0.5, 0.65):
            scan = box[int(frac * (h - 1))]
            got = int((np.diff(scan.astype(np.int8)) == 1).sum() + scan[0])
            if got > best[0]:
                best = (got, (int(x), int(y), int(x + w), int(y + h)))
    return best


def mosaic_score(arr: np.ndarray) -> float:
    """Pixelation: the strongest block-grid edge ratio over block sizes 4..32 (both axes, best phase), measured on a
    full-resolution crop (interior edges flat: a ratio with a small floor). ~1-3 for natural images and heavy
    JPEG, >> 4 for a mosaic."""
    h, w = arr.shape[:2]
    y0, x0 = max(0, (h - 512) // 2), max(0, (w - 512) // 2)
    g = gray(arr[y0:y0 + 512, x0:x0 + 512])
    return _mosaic_profiles(edge_profile(g, 1), edge_profile(g, 0))


def _mosaic_profiles(px: np.ndarray, py: np.ndarray) -> float:
    return max(min(periodic_ratio(px, p, eps=0.25), periodic_ratio(py, p, eps=0.25)) for p in range(4, 33))


def mosaic_find(arr: np.ndarray, min_side: int = 24) -> tuple[float, Box | None]:
    """Pixelation anywhere: the :func:`mosaic_score` measure over the whole picture (at most its central 512 px)
    and over windows of half and a third of its sides (stride half a window), so a mosaic over part of the picture
    is measured where it is, not averaged away by whole rows. The highest score and its window."""
    h, w = arr.shape[:2]
    best, where = mosaic_score(arr), (0, 0, w, h)
    g = gray(arr).astype(np.float64)
    cx = np.vstack([np.zeros((1, w - 1)), np.cumsum(np.abs(np.diff(g, axis=1)), axis=0)])  # column profiles
    cy = np.hstack([np.zeros((h - 1, 1)), np.cumsum(np.abs(np.diff(g, axis=0)), axis=1)])  # row profiles
    for part, step in ((2, 2), (3, 2)):  # halves and thirds, each overlapping its neighbour by half
        wh, ww = min(h // part, 512), min(w // part, 512)
        if min(wh, ww) < min_side:
            continue
        for y in range(0, h - wh + 1, max(1, wh // step)):
            for x in range(0, w - ww + 1, max(1, ww // step)):
                px = (cx[y + wh, x:x + ww - 1] - cx[y, x:x + ww - 1]) / wh
                py = (cy[y:y + wh - 1, x + ww] - cy[y:y + wh - 1, x]) / ww
                got = _mosaic_profiles(px, py)
                if got > best:
                    best, where = got, (x, y, x + ww, y + wh)
    return best, where


def collage_score(arr: np.ndarray, strong: float = 24.0, ref: np.ndarray | None = None) -> float:
    """Straight internal borders: the largest share of one full row / column (inside the middle 80%) where some colour
    channel jumps by more than ``strong``, among at most 4 such lines per axis (a block grid has many: a mosaic).
    With ``ref`` (the row's source, resized to ``arr``) a pixel's jump counts only where the source has no edge of
    even half that strength at the same place: a photograph's own horizon, frame or texture is in both pictures (an
    edit that brightens it makes its jumps larger, not new), a pasted picture's border only in the target."""
    a = arr.astype(np.float32)
    r = None if ref is None else ref.astype(np.float32)
    best = 0.0
    for axis in (0, 1):
        jump = np.abs(np.diff(a, axis=axis)).max(axis=2) > strong
        if r is not None:
            jump &= np.abs(np.diff(r, axis=axis)).max(axis=2) <= strong / 2
        share = jump.mean(axis=1 - axis)
        n = len(share)
        inner = share[int(0.1 * n): int(0.9 * n) + 1]
        if len(inner) and (inner > 0.5).sum() <= 4:
            best = max(best, float(inner.max()))
    return best


def code_score(arr: np.ndarray) -> float:
    return code_find(arr)[0]


def code_find(arr: np.ndarray) -> tuple[float, Box | None]:
    """1.0 and the code's box when OpenCV finds and decodes a QR code or a barcode, else 0.0. Small pictures are
    tried enlarged 2x and 4x (modules of 1-2 px are decoded far more often enlarged)."""
    cv2 = require("cv2", "the QR / barcode detector (artefacts.codes)")
    g0 = np.clip(gray(arr), 0, 255).astype(np.uint8)
    scales = (2, 4) if max(g0.shape) < 256 else (2,) if max(g0.shape) < 1024 else (1,)
    for scale in scales:
        g = g0 if scale == 1 else cv2.resize(g0, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        text, points, _ = cv2.QRCodeDetector().detectAndDecode(g)
        if text:  # decoding confirms: finder-like squares alone do not count
            return 1.0, _points_box(points, scale, arr.shape)
    g = g0 if scales[0] == 1 else cv2.resize(g0, None, fx=scales[0], fy=scales[0], interpolation=cv2.INTER_CUBIC)
    text, points, *_ = cv2.barcode.BarcodeDetector().detectAndDecode(g)  # decoded too: block grids look like bars
    return (1.0, _points_box(points, scales[0], arr.shape)) if text else (0.0, None)


def _points_box(points, scale: int, shape) -> Box | None:
    if points is None:
        return None
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2) / scale
    x0, y0 = np.clip(p.min(axis=0), 0, None)
    x1, y1 = np.minimum(p.max(axis=0), (shape[1], shape[0]))
    return int(x0), int(y0), int(np.ceil(x1)), int(np.ceil(y1))
