"""Message parts for OpenAI-compatible chat completions: text and images as base64 data URLs."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Union

from PIL import Image

from ..errors import FireRedError

ImageLike = Union[Image.Image, bytes, str, Path]

_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
          (b"RIFF", "image/webp"), (b"BM", "image/bmp"))


def _mime(data: bytes, name: str) -> str:
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    raise FireRedError(f"{name}: not a PNG, JPEG, GIF, WebP or BMP image (first bytes {data[:8]!r})")


def image_bytes(img: ImageLike) -> tuple[bytes, str]:
    """The encoded bytes and MIME type of an image; a PIL image is written as PNG (deterministic bytes)."""
    if isinstance(img, Image.Image):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue(), "image/png"
    if isinstance(img, (bytes, bytearray)):
        data = bytes(img)
        return data, _mime(data, "image bytes")
    path = Path(img)
    if not path.is_file():
        raise FireRedError(f"image file {path} does not exist")
    data = path.read_bytes()
    return data, _mime(data, str(path))


def image_part(img: ImageLike) -> dict:
    """``{"type": "image_url", "image_url": {"url": "data:<mime>;base64,..."}}`` for a PIL image, bytes or a path."""
    data, mime = image_bytes(img)
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": str(text)}
