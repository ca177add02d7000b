"""Text accuracy: does the output show the text the instruction asks for, where and as large as it asks?

The typography reward's scoring (:mod:`..rewards.typography`) applied to a bench output: OCR through its plug-in
(:func:`..rewards.ocr.load_ocr`; RapidOCR by default when ``rapidocr`` or ``rapidocr_onnxruntime`` is installed, as
it ships its ONNX models in its wheel), then, for every text quoted in the instruction, ``text_accuracy`` = 1 - the
normalised edit distance to the best OCR reading, ``text_placement`` and ``text_size`` = the reward's alignment and
size terms. An instruction that quotes no text is not measured.
"""

from __future__ import annotations

import importlib.util

from PIL import Image

from ..rewards.ocr import load_ocr
from ..rewards.typography import TypographyConfig, requested_texts, score_text

TEXT_TASKS = ("text",)  # task names whose rows are read by OCR (a row must also quote its text)
RAPIDOCR_HINT = "pip install --no-deps rapidocr_onnxruntime pyclipper shapely"


def default_ocr() -> str | None:
    """``rapidocr`` when RapidOCR is installed, else None (the text metric is then off)."""
    for module in ("rapidocr", "rapidocr_onnxruntime"):
        if importlib.util.find_spec(module) is not None:
            return "rapidocr"
    return None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class TextAccuracy:
    """``metric(output, instruction)`` -> the three terms (means over the quoted texts) and what OCR read, or None
    when the instruction quotes no text."""

    def __init__(self, ocr, cfg: TypographyConfig | None = None):
        self.cfg = cfg or TypographyConfig(ocr=ocr if isinstance(ocr, str) else "engine")
        self.engine = load_ocr(ocr)
        name = ocr if isinstance(ocr, str) else getattr(ocr, "__qualname__", "engine")
        c = self.cfg
        self.name = f"text:{name}:{c.max_height},{c.small_height},{c.large_height},{c.min_confidence}"

    def __call__(self, output: Image.Image, instruction: str) -> dict | None:
        texts = requested_texts(instruction)
        if not texts:
            return None
        boxes = [b for b in self.engine(output) if b.confidence >= self.cfg.min_confidence and b.text.strip()]
        terms = [score_text(t, boxes, output.width, output.height, instruction, self.cfg) for t in texts]
        return {"text_accuracy": _mean([t.correctness for t in terms]),
                "text_placement": _mean([t.alignment for t in terms]),
                "text_size": _mean([t.size for t in terms]),
                "text_requested": texts, "text_read": " | ".join(b.text for b in boxes)[:300]}
