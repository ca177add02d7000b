"""Sizes: how references are resized, what size the output is, and how padding is recorded and undone.

The reference pipeline resizes every reference to a target *area* at its own aspect ratio, snapped to multiples of
32, and by default makes the output ~1 MP at the aspect ratio of the last image, floored to a multiple of 16. That is
where "zoom / shift" between input and output comes from. :func:`pad_to_multiple` / :func:`crop_back` give the
exact-size path instead: pad the input to a multiple of 16 with the padding recorded, edit at that size, crop back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


VL_AREA = 384 * 384
VAE_AREA = 1024 * 1024
OUTPUT_AREA = 1024 * 1024
LATENT_MULTIPLE = 16  # VAE 8x times the 2x2 token patch


def calculate_dimensions(area: float, ratio: float, multiple: int = 32) -> tuple[int, int]:
    """(width, height) of about ``area`` pixels at ``ratio`` = width / height, each rounded to ``multiple``.

    Matches diffusers' ``calculate_dimensions`` for ``multiple=32``; never returns a zero side.
    """
    width = math.sqrt(area * ratio)
    height = width / ratio
    width = max(multiple, round(width / multiple) * multiple)
    height = max(multiple, round(height / multiple) * multiple)
    return int(width), int(height)


def check_size(width: int, height: int) -> None:
    """Raise :class:`~firered_core.limits.OptionError` (an ``InputError`` whose ``field`` is the side) unless
    both sides are multiples of 16 within the limits (the message suggests the nearest allowed size)."""
    from .limits import LIMITS, OptionError, check

    for name, value in (("width", width), ("height", height)):
        try:
            check({name: int(value)}, spell=lambda n: f"{n}={value}:")
        except OptionError as exc:
            nearest = min(LIMITS[name].hi, max(LATENT_MULTIPLE, round(value / LATENT_MULTIPLE) * LATENT_MULTIPLE))
            raise OptionError(f"{exc} (nearest allowed: {int(nearest)})", field=name) from None


def default_output_size(last_image_size: tuple[int, int] | None, area: float = OUTPUT_AREA) -> tuple[int, int]:
    """The reference pipeline's default: ~``area`` at the last image's aspect, floored to a multiple of 16."""
    if last_image_size is None:
        w, h = calculate_dimensions(area, 1.0)
    else:
        w, h = calculate_dimensions(area, last_image_size[0] / last_image_size[1])
    return w // LATENT_MULTIPLE * LATENT_MULTIPLE, h // LATENT_MULTIPLE * LATENT_MULTIPLE


@dataclass(frozen=True)
class PadRecord:
    """Where an image sits inside its padded canvas, so it can be cropped back exactly."""

    width: int
    height: int
    left: int
    top: int
    padded_width: int
    padded_height: int


def pad_record(width: int, height: int, multiple: int = LATENT_MULTIPLE) -> PadRecord:
    """Centre the image in the smallest canvas whose sides are multiples of ``multiple``."""
    pw = -(-width // multiple) * multiple
    ph = -(-height // multiple) * multiple
    return PadRecord(width, height, (pw - width) // 2, (ph - height) // 2, pw, ph)


def pad_to_multiple(image: torch.Tensor, multiple: int = LATENT_MULTIPLE, mode: str = "replicate"
                    ) -> tuple[torch.Tensor, PadRecord]:
    """Pad a [B, H, W, C] image to multiples of ``multiple``; return it with the record that undoes it.

    ``replicate`` padding keeps edge colours so the model sees no artificial border.
    """
    _, h, w, _ = image.shape
    rec = pad_record(w, h, multiple)
    right, bottom = rec.padded_width - w - rec.left, rec.padded_height - h - rec.top
    if right == bottom == rec.left == rec.top == 0:
        return image, rec
    chw = image.permute(0, 3, 1, 2)
    padded = torch.nn.functional.pad(chw, (rec.left, right, rec.top, bottom), mode=mode)
    return padded.permute(0, 2, 3, 1).contiguous(), rec


def crop_back(image: torch.Tensor, record: PadRecord) -> torch.Tensor:
    """Undo :func:`pad_to_multiple` on a [B, H, W, C] image of the padded size (resizing first if it differs)."""
    _, h, w, _ = image.shape
    if (w, h) != (record.padded_width, record.padded_height):
        chw = image.permute(0, 3, 1, 2)
        chw = torch.nn.functional.interpolate(chw, size=(record.padded_height, record.padded_width),
                                              mode="bicubic", align_corners=False, antialias=True)
        image = chw.permute(0, 2, 3, 1).clamp(0, 1)
    return image[:, record.top:record.top + record.height, record.left:record.left + record.width, :]
