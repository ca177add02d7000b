"""A typography-aware reward: is the text the instruction asks for written, in the right place, at a sane size?

For every text quoted in the instruction (``"..."``, ``“...”``, ``‘...’``, ``'...'``, ``「...」``, ``『...』``) the
OCR detections (each line, and all lines joined in reading order) are searched for the best match, and three terms,
each in [0, 1], are computed on it:

- correctness ``c = 1 - lev(req, ocr) / max(len(req), len(ocr))``: the normalised edit distance after Unicode NFKC,
  case folding and removing whitespace (OCR splits spaces differently from how people type them);
- alignment ``a``: with a requested region (from position words in the instruction, e.g. "at the top", "bottom
  left", or given by the caller as a fraction box), the fraction of the text box inside the region; without one,
  the fraction inside the image times its centredness ``1 - |centre offset| / sqrt(2)`` (offsets in half-image
  units, so 1 = centred, 0 = in a corner);
- size ``s``: 1 while the text's line height (its box, or the tallest line of a reading joined from several) is at
  most ``h_max`` of the image height, falling linearly to 0 at the
  full height (oversized text penalised). ``h_max`` follows the instruction: ``small_height`` for "small",
  "tiny", "caption", ...; ``large_height`` for "large", "big", "headline", "title", ...; else ``max_height``.

A requested text scores ``(wc c + wa a + ws s) / (wc + wa + ws)``; an image scores the mean over its requested
texts, 0 when the OCR finds nothing usable. An instruction that quotes no text scores 0 for every rollout: per-group
advantage normalisation then makes it neutral (no update from that prompt).
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Annotated, Callable

from pydantic import Field, with_config

from ..limits import CONFIG, NonNegative, Probability
from .base import RewardBatch
from .ocr import OcrBox, load_ocr

Box = tuple[float, float, float, float]
QUOTES = re.compile(r'"([^"]+)"|“([^”]+)”|‘([^’]+)’|「([^」]+)」|『([^』]+)』|(?<![\w])\'([^\']+)\'(?![\w])')
SMALL = re.compile(r"\b(small|tiny|little|subtle|caption|footnote|fine print)\b|小字|小号", re.IGNORECASE)
LARGE = re.compile(r"\b(large|big|huge|giant|bold headline|headline|title|banner|poster)\b|大字|标题", re.IGNORECASE)
# position words -> (x0, y0, x1, y1) as fractions of the image
VERTICAL = (("top", (0.0, 0.0, 1.0, 1 / 3)), ("upper", (0.0, 0.0, 1.0, 1 / 3)),
            ("bottom", (0.0, 2 / 3, 1.0, 1.0)), ("lower", (0.0, 2 / 3, 1.0, 1.0)))
HORIZONTAL = (("left", (0.0, 0.0, 1 / 3, 1.0)), ("right", (2 / 3, 0.0, 1.0, 1.0)))


@with_config(CONFIG)
@dataclass
class TypographyConfig:
    ocr: str = "rapidocr"  # "rapidocr", "paddleocr" or "package.module:factory"
    correctness_weight: NonNegative = 0.6
    alignment_weight: NonNegative = 0.2
    size_weight: NonNegative = 0.2
    max_height: Annotated[float, Field(gt=0.0, le=1.0)] = 0.25  # text height / image height allowed by default
    small_height: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    large_height: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    min_confidence: Probability = 0.3  # OCR detections below it are ignored

    def __post_init__(self):
        if self.correctness_weight + self.alignment_weight + self.size_weight <= 0:
            raise ValueError("reward.typography: the three weights must not all be 0")


def requested_texts(instruction: str) -> list[str]:
    """The texts quoted in an instruction, in order."""
    return [next(g for g in m.groups() if g is not None) for m in QUOTES.finditer(instruction)]


def normalise(text: str) -> str:
    return "".join(unicodedata.normalize("NFKC", text).casefold().split())


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def text_similarity(requested: str, found: str) -> float:
    """``1 - lev / max(len)`` on normalised texts (1 when both are empty)."""
    a, b = normalise(requested), normalise(found)
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else 1.0 - levenshtein(a, b) / longest


def _area(box: Box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def inside_fraction(box: Box, region: Box) -> float:
    """The fraction of ``box``'s area inside ``region`` (1 for a degenerate box whose centre is inside)."""
    inter = (max(box[0], region[0]), max(box[1], region[1]), min(box[2], region[2]), min(box[3], region[3]))
    area = _area(box)
    if area == 0:
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        return float(region[0] <= cx <= region[2] and region[1] <= cy <= region[3])
    return _area(inter) / area


def requested_region(instruction: str) -> Box | None:
    """A region (fractions of the image) from position words: top / upper / bottom / lower, left / right, and
    their combinations ("bottom left"); None when the instruction names no position."""
    text = instruction.lower()
    x0, y0, x1, y1 = 0.0, 0.0, 1.0, 1.0
    found = False
    for words in (VERTICAL, HORIZONTAL):
        for word, (a, b, c, d) in words:
            if re.search(rf"\b{word}\b", text):
                x0, y0, x1, y1 = max(x0, a), max(y0, b), min(x1, c), min(y1, d)
                found = True
                break
    return (x0, y0, x1, y1) if found else None


def alignment_score(box: Box, width: int, height: int, region: Box | None) -> float:
    """Inside the requested region (fraction box), or inside the image and centred when none is requested."""
    if region is not None:
        return inside_fraction(box, (region[0] * width, region[1] * height, region[2] * width, region[3] * height))
    inside = inside_fraction(box, (0.0, 0.0, float(width), float(height)))
    dx = abs((box[0] + box[2]) / 2 - width / 2) / (width / 2)
    dy = abs((box[1] + box[3]) / 2 - height / 2) / (height / 2)
    return inside * max(0.0, 1.0 - math.hypot(min(dx, 1.0), min(dy, 1.0)) / math.sqrt(2))


def height_limit(instruction: str, cfg: TypographyConfig) -> float:
    if SMALL.search(instruction):
        return cfg.small_height
    if LARGE.search(instruction):
        return cfg.large_height
    return cfg.max_height


def size_score(line_height: float, height: int, limit: float) -> float:
    """1 up to ``limit`` of the image height, then linearly down to 0 at the full height."""
    h = line_height / height
    if h <= limit:
        return 1.0
    return max(0.0, 1.0 - (h - limit) / (1.0 - limit)) if limit < 1 else 0.0


def reading_order(boxes: list[OcrBox]) -> OcrBox | None:
    """All detections joined top-to-bottom, left-to-right, with their union box (text split over several lines).
    Boxes whose vertical centres lie within half a line height of each other are one line, read left to right (an
    OCR engine may split one line into boxes whose centres differ by a few pixels)."""
    if not boxes:
        return None
    lines: list[list[OcrBox]] = []  # a box joins the line whose first box's centre is within half its height
    for b in sorted(boxes, key=lambda b: (b.box[1] + b.box[3]) / 2):
        first = lines[-1][0].box if lines else None
        centre, first_centre = (b.box[1] + b.box[3]) / 2, None if first is None else (first[1] + first[3]) / 2
        if first is not None and abs(centre - first_centre) <= (first[3] - first[1]) / 2:
            lines[-1].append(b)
        else:
            lines.append([b])
    ordered = [b for line in lines for b in sorted(line, key=lambda b: b.box[0])]
    union = (min(b.box[0] for b in boxes), min(b.box[1] for b in boxes), max(b.box[2] for b in boxes),
             max(b.box[3] for b in boxes))
    return OcrBox(" ".join(b.text for b in ordered), union, min(b.confidence for b in boxes))


@dataclass
class TypographyTerms:
    correctness: float
    alignment: float
    size: float
    score: float


def score_text(requested: str, boxes: list[OcrBox], width: int, height: int, instruction: str,
               cfg: TypographyConfig, region: Box | None = None) -> TypographyTerms:
    """The three terms and the weighted score of one requested text against the detections of one image."""
    # (detection, its line height): the joined reading is as tall as its tallest line, not the whole block
    candidates = [(b, b.box[3] - b.box[1]) for b in boxes]
    if len(boxes) > 1:
        candidates.append((reading_order(boxes), max(h for _, h in candidates)))
    if not candidates:
        return TypographyTerms(0.0, 0.0, 0.0, 0.0)
    best, line_height = max(candidates, key=lambda bh: text_similarity(requested, bh[0].text))
    c = text_similarity(requested, best.text)
    a = alignment_score(best.box, width, height, region if region is not None else requested_region(instruction))
    s = size_score(line_height, height, height_limit(instruction, cfg))
    weights = (cfg.correctness_weight, cfg.alignment_weight, cfg.size_weight)
    return TypographyTerms(c, a, s, (weights[0] * c + weights[1] * a + weights[2] * s) / sum(weights))


class TypographyReward:
    """OCR each image and score the instruction's quoted texts (see the module docstring). ``regions`` optionally
    gives a requested box per prompt (fractions of the image), overriding position words."""

    def __init__(self, cfg: TypographyConfig, engine: Callable | None = None):
        self.cfg = cfg
        self.engine = load_ocr(engine if engine is not None else cfg.ocr)
        self.name = f"typography:{cfg.ocr if engine is None else getattr(engine, '__qualname__', 'engine')}:" \
                    f"{cfg.correctness_weight},{cfg.alignment_weight},{cfg.size_weight},{cfg.max_height}," \
                    f"{cfg.small_height},{cfg.large_height},{cfg.min_confidence}"

    def image_score(self, image, instruction: str, region: Box | None = None) -> float:
        texts = requested_texts(instruction)
        if not texts:
            return 0.0
        boxes = [b for b in self.engine(image) if b.confidence >= self.cfg.min_confidence and b.text.strip()]
        width, height = image.size
        return sum(score_text(t, boxes, width, height, instruction, self.cfg, region).score
                   for t in texts) / len(texts)

    def __call__(self, batch: RewardBatch) -> list[float]:
        return [self.image_score(batch.pil(i), batch.prompts[i]) for i in range(len(batch))]
