"""Reading user images into RGB by one documented rule.

Rule: EXIF orientation is applied first; images with transparency (RGBA, LA, PA, P with a transparent index) are
composited on white; every other mode is converted to 8-bit RGB (16-bit greyscale "I;16" / 32-bit "I" / float "F"
are scaled from their full range, CMYK and YCbCr go through Pillow's conversion). Anything Pillow cannot open is
rejected with the file named.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from .errors import FireRedError


class ImageInputError(FireRedError):
    """An input image could not be read or converted."""


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale to 8-bit: I;16 spans 0..65535; I spans 0..65535 when it exceeds 255, else
    0..255; F spans 0..1 when it stays within, else 0..255."""
    arr = np.asarray(img).astype(np.float64)
    peak = arr.max(initial=0.0)
    if img.mode.startswith("I;16"):
        top = 65535.0
    elif img.mode == "I":
        top = 65535.0 if peak > 255 else 255.0
    else:
        top = 1.0 if peak <= 1.0 else 255.0
    return Image.fromarray(np.round(np.clip(arr / top, 0.0, 1.0) * 255.0).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to RGB by the module's rule (EXIF orientation, alpha on white)."""
    img = ImageOps.exif_transpose(img) or img
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _high_bit_depth_to_l(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(path: str | Path, error: type[FireRedError] = ImageInputError, what: str = "image") -> Image.Image:
    """Open and fully read an image file as it is (no conversion); raise ``error`` naming the file on failure."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except Image.DecompressionBombError as exc:
        raise error(f"{what} {path} is refused as a possible decompression bomb: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise error(f"cannot read {what} {path}: {exc}") from exc


def load_image(path: str | Path) -> Image.Image:
    """Open an image file and convert it to RGB; raise :class:`ImageInputError` naming the file on failure."""
    return to_rgb(open_image(path))


def check_output_path(path: str | Path) -> Path:
    """Refuse, before any work is done, an output path that could not be written: an existing folder, a path under
    a file, a folder without write permission, or an extension Pillow cannot save."""
    path = Path(path)
    if path.is_dir():
        raise ImageInputError(f"output {path} is an existing folder; give a file name such as {path / 'edit.png'}")
    extensions = Image.registered_extensions()
    suffix = path.suffix.lower()
    if suffix not in extensions or extensions[suffix] not in Image.SAVE:
        raise ImageInputError(f"output {path}: unknown image file extension {suffix or '(none)'!r}; use .png, "
                              ".jpg, .webp, .tif or .bmp")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ImageInputError(f"output {path}: {parent} is a file, not a folder")
    target = path if path.exists() else parent
    if not os.access(target, os.W_OK):
        raise ImageInputError(f"output {path}: no permission to write {'it' if target == path else target}")
    return path


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor [H, W, 3] in 0..1 (ComfyUI's IMAGE layout, without the batch)."""
    return torch.from_numpy(np.asarray(to_rgb(img), dtype=np.float32) / 255.0)


def tensor_to_pil(t: torch.Tensor) -> Image.Image:
    """Float tensor [H, W, 3] in 0..1 -> RGB PIL image (rounded as diffusers' postprocess does)."""
    arr = (t.detach().float().clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(arr, mode="RGB")
