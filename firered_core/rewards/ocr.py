"""OCR engines as plug-ins: ``engine(image) -> [OcrBox(text, box, confidence), ...]``.

``rapidocr`` and ``paddleocr`` adapt those packages when they are installed (neither is required: asking for one
that is missing is a :class:`RewardError` saying what to install); ``package.module:factory`` is any engine of yours
(the factory returns the callable; it may return :class:`OcrBox` items or ``(text, box, confidence)`` tuples, a box
being ``(x0, y0, x1, y1)`` or a polygon of ``(x, y)`` points, in pixels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
from PIL import Image

from ..plugins import import_object
from .base import RewardError


@dataclass(frozen=True)
class OcrBox:
    text: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    confidence: float = 1.0


class OcrEngine(Protocol):
    def __call__(self, image: Image.Image) -> Sequence[OcrBox | tuple]: ...


def axis_box(box) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` from a 4-number box or a polygon of points (its bounding box)."""
    arr = np.asarray(box, dtype=np.float64)
    if arr.shape == (4,):
        x0, y0, x1, y1 = arr.tolist()
    elif arr.ndim == 2 and arr.shape[1] == 2 and len(arr) >= 2:
        (x0, y0), (x1, y1) = arr.min(0).tolist(), arr.max(0).tolist()
    else:
        raise RewardError(f"OCR box {box!r} is neither (x0, y0, x1, y1) nor a list of (x, y) points")
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def as_boxes(items) -> list[OcrBox]:
    """An engine's output as :class:`OcrBox` items (tuples ``(text, box, confidence)`` accepted)."""
    out = []
    for item in items or []:
        if isinstance(item, OcrBox):
            out.append(OcrBox(str(item.text), axis_box(item.box), float(item.confidence)))
            continue
        try:
            text, box, conf = item
        except (TypeError, ValueError):
            raise RewardError(f"OCR result {item!r} is not (text, box, confidence)") from None
        out.append(OcrBox(str(text), axis_box(box), float(conf)))
    return out


def from_rapidocr(result) -> list[OcrBox]:
    """RapidOCR's output: ``rapidocr`` >= 2 returns an object with ``boxes`` / ``txts`` / ``scores``;
    ``rapidocr_onnxruntime`` returns ``(items, elapse)`` with items ``[polygon, text, score]`` (None when empty)."""
    if hasattr(result, "txts"):
        if result.txts is None:
            return []
        return as_boxes(zip(result.txts, result.boxes, result.scores))
    items = result[0] if isinstance(result, tuple) else result
    return as_boxes((text, box, score) for box, text, score in (items or []))


def from_paddleocr(result) -> list[OcrBox]:
    """PaddleOCR's output: 3.x ``predict`` gives per-image results with ``rec_texts`` / ``rec_polys`` /
    ``rec_scores``; 2.x ``ocr`` gives per-image lists of ``[polygon, (text, score)]``."""
    page = result[0] if isinstance(result, list) and result else result
    if not page:
        return []
    if hasattr(page, "get") and page.get("rec_texts") is not None:
        return as_boxes(zip(page["rec_texts"], page["rec_polys"], page["rec_scores"]))
    return as_boxes((text, box, score) for box, (text, score) in page)


def _rapidocr() -> Callable:
    try:
        from rapidocr import RapidOCR
    except ImportError:
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError:
            raise RewardError("reward.typography.ocr 'rapidocr' needs the RapidOCR package: pip install rapidocr "
                              "onnxruntime (or give your own engine as 'package.module:factory')") from None
    engine = RapidOCR()
    return lambda image: from_rapidocr(engine(np.asarray(image.convert("RGB"))[..., ::-1].copy()))


def _paddleocr() -> Callable:
    try:
        from paddleocr import PaddleOCR
    except ImportError:
        raise RewardError("reward.typography.ocr 'paddleocr' needs PaddleOCR: pip install paddleocr paddlepaddle "
                          "(or give your own engine as 'package.module:factory')") from None
    engine = PaddleOCR()
    run = getattr(engine, "predict", None) or engine.ocr
    return lambda image: from_paddleocr(run(np.asarray(image.convert("RGB"))[..., ::-1].copy()))


BUILTIN = {"rapidocr": _rapidocr, "paddleocr": _paddleocr}


def load_ocr(spec: str | Callable) -> Callable[[Image.Image], list[OcrBox]]:
    """An OCR engine from ``rapidocr``, ``paddleocr``, ``package.module:factory`` or a callable, wrapped so that it
    always returns :class:`OcrBox` items."""
    if callable(spec):
        engine = spec
    elif spec in BUILTIN:
        return BUILTIN[spec]()
    else:
        engine = import_object(spec, "reward.typography.ocr", RewardError)()
        if not callable(engine):
            raise RewardError(f"reward.typography.ocr {spec!r}: the factory returned {type(engine).__name__}, not "
                              "a callable engine")
    return lambda image: as_boxes(engine(image))
