"""More than three pictures: crop each to its region of interest, pack the crops into 2-3 composites, and rewrite
the instruction's picture mentions to the new pictures.

FireRed is trained on 1-3 pictures. With more, each picture is cropped to its region of interest (a user box, the
bounding box of a user mask, or :func:`propose_roi`), the crops are split into 2-3 groups (picture order kept) and
each group is laid out without whitespace in justified rows or columns (every contiguous split is tried; the
layout closest to square within aspect 0.5-2 wins; outside that range the canvas is padded white), then scaled to
about ``area`` pixels (sides multiples of 16). Everything is deterministic: the same inputs give the same
composites. Mentions ("Picture 5", "image 5", "图5", "第5张图") become the composite and position ("the second item
(right) of Picture 2", "图2中的第二项（右）"), and :meth:`PackResult.table` shows the mapping.

One module on purpose (~440 lines): proposal, layout and mention rewriting share the crop records and the
picture numbering, and are read together when a packed instruction looks wrong.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field

import torch

from .errors import FireRedError
from .stitch import resize_picture

MAX_COMPOSITES = 3
MIN_ASPECT, MAX_ASPECT = 0.5, 2.0
PACK_AREA = 1024 * 1024
SIDE_MULTIPLE = 16
ROI_MARGIN = 0.04  # of the picture's side, around a proposed or mask box
ORDINALS_EN = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
NUMERALS_ZH = "一二三四五六七八九十"
POSITION_ZH = {"left": "左", "right": "右", "top": "上", "bottom": "下", "centre": "中"}

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, end exclusive


class PackError(FireRedError):
    """Pictures, boxes or mentions that cannot be packed."""


@dataclass(frozen=True)
class Placement:
    """Where original picture ``picture`` (1-based) went: item ``item`` of composite ``composite`` (1-based)."""

    picture: int
    composite: int
    item: int
    items: int  # items in that composite
    box: Box  # the crop, in the original picture
    rect: tuple[int, int, int, int]  # x, y, width, height in the composite
    position: str  # "left", "top right", ... ("" when the composite holds one item)

    def mention(self, language: str = "en") -> str:
        """How the instruction names this picture now."""
        if language == "zh":
            if self.items == 1:
                return f"图{self.composite}"
            where = _position_zh(self.position)
            n = _numeral_zh(self.item)
            return f"图{self.composite}中的第{n}项" + (f"（{where}）" if where else "")
        if self.items == 1:
            return f"Picture {self.composite}"
        n = ORDINALS_EN[self.item - 1] if self.item <= len(ORDINALS_EN) else f"#{self.item}"
        where = f" ({self.position})" if self.position else ""
        return f"the {n} item{where} of Picture {self.composite}"


@dataclass
class PackResult:
    """The composites ([H, W, 3] in 0..1, white where empty) and where each original picture went."""

    composites: list[torch.Tensor]
    placements: list[Placement]
    sources: list[str] = field(default_factory=list)  # how each crop was chosen: box, mask, auto, whole

    def placement(self, picture: int) -> Placement:
        for p in self.placements:
            if p.picture == picture:
                return p
        raise PackError(f"the instruction mentions Picture {picture}, but only {len(self.placements)} pictures "
                        "were given", field="prompt")

    def rewrite(self, prompt: str) -> str:
        """Replace every picture mention by its new composite and position (one pass: no mention is rewritten
        twice)."""
        return rewrite_mentions(prompt, self)

    def table(self) -> str:
        """The mapping as a plain-text table, for the user."""
        rows = [("picture", "crop (x0,y0,x1,y1)", "from", "now", "instruction says", "中文")]
        for p in sorted(self.placements, key=lambda p: p.picture):
            rows.append((f"Picture {p.picture}", ",".join(map(str, p.box)),
                         self.sources[p.picture - 1] if self.sources else "",
                         f"Picture {p.composite} item {p.item}/{p.items}", p.mention("en"), p.mention("zh")))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        return "\n".join(" | ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def _numeral_zh(n: int) -> str:
    return NUMERALS_ZH[n - 1] if n <= len(NUMERALS_ZH) else str(n)


def _position_zh(position: str) -> str:
    """"top left" -> 左上 order as Chinese says it (上左 is unusual: 左上); "third from left" -> 左起第三."""
    out = []
    for part in re.findall(r"(\w+) from (\w+)|(\w+)", position):
        ordinal, side, word = part
        if ordinal:
            out.append(f"{POSITION_ZH[side]}起第{_numeral_zh(ORDINALS_EN.index(ordinal) + 1)}")
        else:
            out.append(POSITION_ZH[word])
    if len(out) == 2 and out[0] in ("上", "下") and out[1] in ("左", "右"):
        out.reverse()
    return "".join(out)


# ---- regions of interest --------------------------------------------------------------------------------------

def _with_margin(box: Box, width: int, height: int) -> Box:
    mx, my = round(ROI_MARGIN * width), round(ROI_MARGIN * height)
    x0, y0, x1, y1 = box
    return max(0, x0 - mx), max(0, y0 - my), min(width, x1 + mx), min(height, y1 + my)


def _bbox(on: torch.Tensor) -> Box | None:
    ys, xs = torch.nonzero(on, as_tuple=True)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def roi_from_mask(mask: torch.Tensor, width: int, height: int) -> Box:
    """The bounding box (plus a 4% margin) of a mask's > 0.5 part, the mask stretched to the picture first; the
    whole picture when the mask is empty."""
    from .masks import resize_mask

    box = _bbox(resize_mask(mask, width, height)[0] > 0.5)
    return (0, 0, width, height) if box is None else _with_margin(box, width, height)


def propose_roi(image: torch.Tensor, threshold: float = 0.1, min_fraction: float = 0.005) -> Box:
    """The region of non-background content of an [H, W, 3] picture.

    The background colour is the median of the outermost ring of pixels; a pixel is content when a channel differs
    from it by more than ``threshold`` or the local gradient does. The box spans the 1st-99th percentile of content
    pixels in x and y (so a few stray pixels do not stretch it) plus a 4% margin. With less than ``min_fraction``
    content (a blank picture) or none to cut away (a photo filling its frame), the whole picture.
    """
    h, w, _ = image.shape
    if h < 8 or w < 8:
        return 0, 0, w, h
    ring = torch.cat([image[0], image[-1], image[:, 0], image[:, -1]])
    background = ring.median(dim=0).values
    content = (image - background).abs().amax(-1) > threshold
    gx = torch.zeros(h, w)
    gy = torch.zeros(h, w)
    gx[:, 1:] = (image[:, 1:] - image[:, :-1]).abs().amax(-1)
    gy[1:] = (image[1:] - image[:-1]).abs().amax(-1)
    content |= torch.maximum(gx, gy) > 2 * threshold
    content[0], content[-1], content[:, 0], content[:, -1] = False, False, False, False
    if content.float().mean() < min_fraction:
        return 0, 0, w, h
    ys, xs = torch.nonzero(content, as_tuple=True)
    q = torch.tensor([0.01, 0.99])
    x0, x1 = torch.quantile(xs.float(), q).tolist()
    y0, y1 = torch.quantile(ys.float(), q).tolist()
    return _with_margin((int(x0), int(y0), int(math.ceil(x1)) + 1, int(math.ceil(y1)) + 1), w, h)


def check_box(box: Box, width: int, height: int, picture: int) -> Box:
    x0, y0, x1, y1 = (int(v) for v in box)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise PackError(f"box {tuple(box)} for Picture {picture} is empty inside its {width}x{height} picture "
                        "(x0,y0,x1,y1 in pixels, x1 > x0, y1 > y0)", field="boxes")
    return x0, y0, x1, y1


def parse_boxes(text: str) -> dict[int, Box]:
    """``"5: 10,20,300,400"`` per line (or ``;``-separated): picture number -> box. Empty text -> no boxes."""
    boxes: dict[int, Box] = {}
    for part in re.split(r"[;\n]", text or ""):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*[:=]\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)", part)
        if not m:
            raise PackError(f"box {part!r}: expected 'PICTURE: x0,y0,x1,y1' in pixels, e.g. '5: 10,20,300,400'",
                            field="boxes")
        boxes[int(m.group(1))] = tuple(int(m.group(k)) for k in range(2, 6))
    return boxes


# ---- layout -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """Cells in units (content width or height 1), the content's aspect and the canvas's (padded into limits)."""

    cells: tuple[tuple[float, float, float, float], ...]  # x, y, w, h per item, in item order
    width: float
    height: float
    kind: str  # rows / columns
    lines: int

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def canvas_aspect(self) -> float:
        return min(MAX_ASPECT, max(MIN_ASPECT, self.aspect))

    @property
    def whitespace(self) -> float:
        a, c = self.aspect, self.canvas_aspect
        return 1.0 - min(a, c) / max(a, c)


def _splits(n: int):
    """Every split of 0..n-1 into contiguous runs, fewest runs first."""
    for runs in range(1, n + 1):
        for cuts in itertools.combinations(range(1, n), runs - 1):
            bounds = (0, *cuts, n)
            yield [list(range(bounds[i], bounds[i + 1])) for i in range(runs)]


def _rows(aspects: list[float], split) -> Layout:
    """Justified rows: each row's items share a height, every row is 1 wide."""
    cells, y = [], 0.0
    for run in split:
        h = 1.0 / sum(aspects[i] for i in run)
        x = 0.0
        for i in run:
            cells.append((x, y, aspects[i] * h, h))
            x += aspects[i] * h
        y += h
    return Layout(tuple(cells), 1.0, y, "rows", len(split))


def _columns(aspects: list[float], split) -> Layout:
    """Justified columns: each column's items share a width, every column is 1 high."""
    cells, x = [], 0.0
    for run in split:
        w = 1.0 / sum(1.0 / aspects[i] for i in run)
        y = 0.0
        for i in run:
            cells.append((x, y, w, w / aspects[i]))
            y += w / aspects[i]
        x += w
    return Layout(tuple(cells), x, 1.0, "columns", len(split))


def best_layout(aspects: list[float]) -> Layout:
    """The layout with the least whitespace, then closest to square, then first in a fixed order."""
    best, best_key = None, None
    for k, split in enumerate(_splits(len(aspects))):
        for j, layout in enumerate((_rows(aspects, split), _columns(aspects, split))):
            if len(aspects) == 1 and j:
                continue
            key = (round(layout.whitespace, 9), round(abs(math.log(layout.aspect)), 9), k, j)
            if best_key is None or key < best_key:
                best, best_key = layout, key
    return best


def canvas_size(aspect: float, area: float) -> tuple[int, int]:
    """Sides (multiples of 16) of about ``area`` pixels at ``aspect``, kept within the aspect limits."""
    w = max(SIDE_MULTIPLE, round(math.sqrt(area * aspect) / SIDE_MULTIPLE) * SIDE_MULTIPLE)
    h = max(SIDE_MULTIPLE, round(w / aspect / SIDE_MULTIPLE) * SIDE_MULTIPLE)
    while w / h > MAX_ASPECT:
        h += SIDE_MULTIPLE
    while w / h < MIN_ASPECT:
        w += SIDE_MULTIPLE
    return w, h


def _edges(start: float, lengths: list[float], scale: float) -> list[int]:
    """Integer edges of consecutive spans (shared edges: no gap, no overlap)."""
    out, pos = [round(start)], start
    for length in lengths:
        pos += length * scale
        out.append(round(pos))
    return out


def pixel_rects(layout: Layout, width: int, height: int) -> list[tuple[int, int, int, int]]:
    """Integer rectangles (x, y, w, h) of the layout's cells on a ``width`` x ``height`` canvas, content centred."""
    scale = min(width / layout.width, height / layout.height)
    ox, oy = (width - layout.width * scale) / 2, (height - layout.height * scale) / 2
    rects = []
    groups: dict[float, list[int]] = {}
    along = 1 if layout.kind == "rows" else 0  # cells of one line share this coordinate
    for i, cell in enumerate(layout.cells):
        groups.setdefault(round(cell[along], 9), []).append(i)
    lines = sorted(groups)
    across = _edges(oy if along == 1 else ox, [layout.cells[groups[k][0]][2 + along] for k in lines], scale)
    rects = [None] * len(layout.cells)
    for li, key in enumerate(lines):
        members = groups[key]
        start = ox if along == 1 else oy
        e = _edges(start, [layout.cells[i][2 + (1 - along)] for i in members], scale)
        for j, i in enumerate(members):
            if along == 1:
                rects[i] = (e[j], across[li], e[j + 1] - e[j], across[li + 1] - across[li])
            else:
                rects[i] = (across[li], e[j], across[li + 1] - across[li], e[j + 1] - e[j])
    return rects


def _place_word(index: int, count: int, words: tuple[str, str, str]) -> str:
    """Position of item ``index`` of ``count`` along one axis: first / middle / last word ("" when alone)."""
    if count == 1:
        return ""
    if index == 0:
        return words[0]
    if index == count - 1:
        return words[2]
    if count == 3:
        return words[1]
    return f"{ORDINALS_EN[index]} from {words[0]}"


def position_words(layout: Layout, item: int) -> str:
    """"left", "right", "top left", ... of item ``item`` (0-based) from its line and its place in that line."""
    counts, line, seen = [], 0, 0
    keys = [round(c[1 if layout.kind == "rows" else 0], 9) for c in layout.cells]
    for key in dict.fromkeys(keys):
        counts.append(keys.count(key))
    for li, c in enumerate(counts):
        if item < seen + c:
            line, index = li, item - seen
            break
        seen += c
    across = _place_word(line, len(counts), ("top", "middle", "bottom") if layout.kind == "rows"
                         else ("left", "middle", "right"))
    along = _place_word(index, counts[line], ("left", "middle", "right") if layout.kind == "rows"
                        else ("top", "middle", "bottom"))
    vertical, horizontal = (across, along) if layout.kind == "rows" else (along, across)
    words = [w for w in (vertical, horizontal) if w and w != "middle"] or ["centre"]
    return " ".join(words)


def group_sizes(n: int, composites: int) -> list[list[int]]:
    """Every way of giving n items to ``composites`` groups whose sizes differ by at most one (fixed order)."""
    base, extra = divmod(n, composites)
    options = sorted(set(itertools.permutations([base + 1] * extra + [base] * (composites - extra))), reverse=True)
    return [list(o) for o in options]


def default_composites(n: int) -> int:
    """2 composites for 4 pictures, 3 from 5 on (about two items each); fewer pictures, one each up to 3."""
    return min(MAX_COMPOSITES, max(1, math.ceil(n / 2))) if n > 3 else n


# ---- packing ----------------------------------------------------------------------------------------------------

def pack_pictures(images: list[torch.Tensor], boxes: dict[int, Box] | None = None,
                  masks: dict[int, torch.Tensor] | None = None, composites: int | None = None,
                  area: float = PACK_AREA, auto_roi: bool = True, background: float = 1.0) -> PackResult:
    """Crop and pack [H, W, 3] pictures (0..1) into composites; see the module's docstring.

    ``boxes`` / ``masks`` map a 1-based picture number to its region of interest (a box wins over a mask); other
    pictures get :func:`propose_roi` (or stay whole with ``auto_roi=False``). ``composites`` (1-3) defaults to
    :func:`default_composites`.
    """
    n = len(images)
    if n < 2:
        raise PackError(f"{n} picture(s) given; packing needs at least 2")
    boxes, masks = boxes or {}, masks or {}
    for k in (*boxes, *masks):
        if not 1 <= k <= n:
            raise PackError(f"a box or mask is given for Picture {k}, but there are {n} pictures", field="boxes")
    k_out = composites or default_composites(n)
    if not 1 <= k_out <= min(MAX_COMPOSITES, n):
        raise PackError(f"composites={k_out}: give 1-{min(MAX_COMPOSITES, n)} for {n} pictures", field="composites")
    crops, crop_boxes, sources = [], [], []
    for i, img in enumerate(images, 1):
        if img.ndim != 3 or img.shape[-1] < 3:
            raise PackError(f"Picture {i}: expected [height, width, 3], got shape {tuple(img.shape)}")
        h, w = img.shape[:2]
        if i in boxes:
            box, how = check_box(boxes[i], w, h, i), "box"
        elif i in masks:
            box, how = roi_from_mask(masks[i], w, h), "mask"
        elif auto_roi:
            box, how = propose_roi(img[..., :3].float()), "auto"
        else:
            box, how = (0, 0, w, h), "whole"
        if how == "auto" and box == (0, 0, w, h):
            how = "whole"
        crops.append(img[box[1]:box[3], box[0]:box[2], :3].float())
        crop_boxes.append(box)
        sources.append(how)
    aspects = [c.shape[1] / c.shape[0] for c in crops]

    best = None
    for sizes in group_sizes(n, k_out):
        start, plan = 0, []
        for size in sizes:
            plan.append((list(range(start, start + size)), best_layout(aspects[start:start + size])))
            start += size
        waste = sum(layout.whitespace for _, layout in plan)
        if best is None or waste < best[0] - 1e-9:
            best = (waste, plan)

    out, placements = [], []
    for c, (members, layout) in enumerate(best[1], 1):
        width, height = canvas_size(layout.canvas_aspect, area)
        canvas = torch.full((height, width, 3), background, dtype=torch.float32)
        rects = pixel_rects(layout, width, height)
        for item, (i, rect) in enumerate(zip(members, rects), 1):
            x, y, rw, rh = rect
            canvas[y:y + rh, x:x + rw] = resize_picture(crops[i], rw, rh)
            words = position_words(layout, item - 1) if len(members) > 1 else ""
            placements.append(Placement(i + 1, c, item, len(members), crop_boxes[i], rect, words))
        out.append(canvas)
    return PackResult(out, placements, sources)


# ---- mentions ---------------------------------------------------------------------------------------------------

MENTION = re.compile(
    r"(?P<en>\b(?:picture|image|photo|pic|img)\s*#?\s*(?P<en_n>\d+)\b)"
    r"|(?P<zh1>第\s*(?P<zh1_n>\d+)\s*(?:张|幅)\s*(?:图片|图像|照片|图)?)"
    r"|(?P<zh2>(?:图片|图像|照片|图)\s*(?P<zh2_n>\d+))",
    re.IGNORECASE)


def mentions(prompt: str) -> list[int]:
    """Picture numbers mentioned, in order."""
    return [int(m.group("en_n") or m.group("zh1_n") or m.group("zh2_n")) for m in MENTION.finditer(prompt)]


def rewrite_mentions(prompt: str, result: PackResult) -> str:
    """English mentions become English phrases, Chinese ones Chinese; an unknown picture number is an error."""
    def replace(m: re.Match) -> str:
        if m.group("en"):
            return result.placement(int(m.group("en_n"))).mention("en")
        return result.placement(int(m.group("zh1_n") or m.group("zh2_n"))).mention("zh")
    return MENTION.sub(replace, prompt)
