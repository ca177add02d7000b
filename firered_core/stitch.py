"""Stitching several pictures into one reference, for more pictures than the model's three reference slots.

FireRed is trained on 1-3 references; its agent handles more by combining pictures into composites on a white
background. Here the pictures are scaled to a common height (row) or width (column), or to a common cell (grid),
aspect ratio kept, and centred in their cells on white. Nothing is cropped.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import InputError

LAYOUTS = ("row", "column", "grid")


def resize_picture(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[H, W, C] in 0..1 -> [height, width, C] (area-averaging when shrinking, bicubic when enlarging)."""
    if (image.shape[1], image.shape[0]) == (width, height):
        return image
    chw = image.permute(2, 0, 1)[None]
    mode = "area" if width * height < image.shape[0] * image.shape[1] else "bicubic"
    out = F.interpolate(chw, size=(height, width), mode=mode, **({} if mode == "area" else {"align_corners": False}))
    return out[0].permute(1, 2, 0).clamp(0, 1)


def _fit(image: torch.Tensor, width: int, height: int, background: float) -> torch.Tensor:
    """Scale ``image`` to fit inside ``width`` x ``height`` and centre it on ``background``."""
    scale = min(width / image.shape[1], height / image.shape[0])
    w, h = max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))
    cell = torch.full((height, width, image.shape[2]), background, dtype=image.dtype)
    top, left = (height - h) // 2, (width - w) // 2
    cell[top:top + h, left:left + w] = resize_picture(image, w, h)
    return cell


def stitch(images: list[torch.Tensor], layout: str = "row", size: int = 1024, gap: int = 0,
           background: float = 1.0) -> torch.Tensor:
    """Combine [H, W, C] pictures into one [H', W', C] picture.

    ``size`` is the common height (row), width (column) or cell side (grid); ``gap`` pixels of ``background``
    separate the pictures.
    """
    if not images:
        raise InputError("no pictures to stitch")
    if layout not in LAYOUTS:
        raise InputError(f"layout {layout!r} is not one of {LAYOUTS}", field="layout")
    if layout == "row":
        cells = [_fit(i, max(1, round(i.shape[1] * size / i.shape[0])), size, background) for i in images]
        cols, rows = len(cells), 1
    elif layout == "column":
        cells = [_fit(i, size, max(1, round(i.shape[0] * size / i.shape[1])), background) for i in images]
        cols, rows = 1, len(cells)
    else:
        cols = math.ceil(math.sqrt(len(images)))
        rows = math.ceil(len(images) / cols)
        cells = [_fit(i, size, size, background) for i in images]
    c = images[0].shape[2]
    if layout == "row":
        width, height = sum(x.shape[1] for x in cells) + gap * (cols - 1), size
    elif layout == "column":
        width, height = size, sum(x.shape[0] for x in cells) + gap * (rows - 1)
    else:
        width, height = cols * size + gap * (cols - 1), rows * size + gap * (rows - 1)
    canvas = torch.full((height, width, c), background, dtype=images[0].dtype)
    x = y = 0
    for k, cell in enumerate(cells):
        if layout == "grid":
            x, y = (k % cols) * (size + gap), (k // cols) * (size + gap)
        canvas[y:y + cell.shape[0], x:x + cell.shape[1]] = cell
        if layout == "row":
            x += cell.shape[1] + gap
        elif layout == "column":
            y += cell.shape[0] + gap
    return canvas
