"""Artefact heuristics on one image: overlay text / watermarks, mosaic (pixelation), collage borders, QR codes and
barcodes. Each returns a plain score; the thresholds live in the stage config (ArtefactConfig)."""

from __future__ import annotations

import numpy as np

from .extras import require
from .imageops import edge_profile, gray, periodic_ratio


def text_score(arr: np.ndarray) -> float:
    """Overlay text: thin high-contrast strokes (top-hat / black-hat) joined into line blobs; the score is the most
    stroke crossings along one blob's scan lines. Shape edges cross 1-4 times; a word of text 8 or more."""
    cv2 = require("cv2", "the overlay-text / watermark detector (artefacts.text)")
    g = np.clip(gray(arr), 0, 255).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (9, 9))
    best = 0
    for op in (cv2.MORPH_TOPHAT, cv2.MORPH_BLACKHAT):  # light text, dark text: one polarity at a time
        mask = (cv2.morphologyEx(g, op, kernel) > 40).astype(np.uint8)
        lines = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_RECT, (7, 1)))
        n, _, stats, _ = cv2.connectedComponentsWithStats(lines, connectivity=8)
        for i in range(1, n):
            x, y, w, h, _ = stats[i]
            if not (6 <= h <= 48 and w >= 1.5 * h) or y == 0 or y + h == g.shape[0]:
                continue  # a text line: at least 6 px high, wider than high, off the border (morphology edges)
            box = mask[y:y + h, x:x + w]
            for frac in (0.35, 0.5, 0.65):
                scan = box[int(frac * (h - 1))]
                best = max(best, int((np.diff(scan.astype(np.int8)) == 1).sum() + scan[0]))
    return float(best)


def mosaic_score(arr: np.ndarray) -> float:
    """Pixelation: the strongest block-grid edge ratio over block sizes 4..32 (both axes, best phase), measured on a
    full-resolution crop (interior edges flat: a ratio with a small floor). ~1-3 for natural images and heavy
    JPEG, >> 4 for a mosaic."""
    h, w = arr.shape[:2]
    y0, x0 = max(0, (h - 512) // 2), max(0, (w - 512) // 2)
    g = gray(arr[y0:y0 + 512, x0:x0 + 512])
    px, py = edge_profile(g, 1), edge_profile(g, 0)
    return max(min(periodic_ratio(px, p, eps=0.25), periodic_ratio(py, p, eps=0.25)) for p in range(4, 33))


def collage_score(arr: np.ndarray, strong: float = 24.0) -> float:
    """Straight internal borders: the largest share of one full row / column (inside the middle 80%) where some colour
    channel jumps by more than ``strong``, among at most 4 such lines per axis (a block grid has many: a mosaic)."""
    a = arr.astype(np.float32)
    best = 0.0
    for axis in (0, 1):
        share = (np.abs(np.diff(a, axis=axis)).max(axis=2) > strong).mean(axis=1 - axis)
        n = len(share)
        inner = share[int(0.1 * n): int(0.9 * n) + 1]
        if len(inner) and (inner > 0.5).sum() <= 4:
            best = max(best, float(inner.max()))
    return best


def code_score(arr: np.ndarray) -> float:
    """1.0 when OpenCV finds a QR code or a barcode, else 0.0."""
    cv2 = require("cv2", "the QR / barcode detector (artefacts.codes)")
    g = np.clip(gray(arr), 0, 255).astype(np.uint8)
    if max(g.shape) < 1024:  # small codes: modules of 1-2 pixels are found far more often at twice the size
        g = cv2.resize(g, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    if cv2.QRCodeDetector().detectAndDecode(g)[0]:  # decoding confirms: finder-like squares alone do not count
        return 1.0
    ok, *_ = cv2.barcode.BarcodeDetector().detect(g)
    return 1.0 if ok else 0.0
