"""Small picture makers that both planted sets share (synthetic scenes and real photographs): a JPEG round trip and
a QR code."""

from __future__ import annotations

import io

from PIL import Image


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def qr_image(text: str, side: int) -> Image.Image:
    import cv2

    code = cv2.QRCodeEncoder.create().encode(text)
    return Image.fromarray(code).convert("RGB").resize((side, side), Image.NEAREST)
