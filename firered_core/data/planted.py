"""Planted-defect data sets: clean synthetic edit pairs mixed with rows carrying one known defect each.

Used by the tests, ``benchmarks/data_filters.py`` and ``firered-data demo``. Every row's ground truth is written to
``truth.json`` (uid -> defect class; "clean" for clean rows). Scenes are gradients with coloured shapes and a fixed
noise texture; an edit changes only its region (the noise is shared by source and target).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .files import write_json

COLOURS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 60), "yellow": (235, 210, 40),
           "purple": (140, 50, 180), "orange": (240, 140, 30)}
COLOURS_CN = {"red": "红色", "blue": "蓝色", "green": "绿色", "yellow": "黄色", "purple": "紫色", "orange": "橙色"}
SHAPES_CN = {"circle": "圆", "square": "方块", "triangle": "三角形"}

DEFECTS = {
    "dedup": ["exact_dup", "dup_resize", "dup_jpeg", "dup_crop", "dup_jitter"],
    "pair": ["trivial", "unrelated"],
    "photometric": ["overexposed", "underexposed", "desaturated", "blurred", "heavy_jpeg", "colour_cast", "noise"],
    "artefacts": ["text", "logo", "mosaic", "collage", "qr", "barcode"],
}


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple, colour) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _box(rng, w: int, h: int, lo: float = 0.15, hi: float = 0.35) -> tuple:
    s = int(rng.uniform(lo, hi) * min(w, h))
    x, y = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
    return (x, y, x + s, y + s)


def base_scene(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A smooth two-colour gradient in a random direction with 3-5 shapes (no noise yet)."""
    c0, c1 = rng.integers(30, 226, 3), rng.integers(30, 226, 3)
    ang = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:h, 0:w]
    t = ((x / w - 0.5) * np.cos(ang) + (y / h - 0.5) * np.sin(ang)) + 0.5
    t = np.clip(t, 0, 1)[..., None]
    img = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 6))):
        _draw_shape(draw, str(rng.choice(["circle", "square", "triangle"])), _box(rng, w, h, 0.1, 0.4),
                    tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img


def texture(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    return rng.normal(0, 6, (h, w, 1)).repeat(3, axis=2)


def finish(img: Image.Image, noise: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def clean_pair(rng: np.random.Generator, w: int, h: int, task: str) -> tuple[Image.Image, Image.Image, dict]:
    base, noise = base_scene(rng, w, h), texture(rng, w, h)
    colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(list(SHAPES_CN)))
    if task == "style":
        src = finish(base, noise)
        arr = np.asarray(src, dtype=np.float32) / 255.0
        tgt = Image.fromarray((np.clip(arr[..., [2, 0, 1]] ** 0.8, 0, 1) * 255).astype(np.uint8))
        text = {"instruction": "Give Picture 1 a cool film look", "instruction_cn": "给图1加上冷色胶片风格"}
        return src, tgt, text
    for _ in range(20):  # a visible edit: the new shape must differ from what it covers
        edited = base.copy()
        _draw_shape(ImageDraw.Draw(edited), shape, _box(rng, w, h), COLOURS[colour])
        if np.abs(np.asarray(edited, np.float32) - np.asarray(base, np.float32)).mean() > 2.0:
            break
        colour = str(rng.choice(list(COLOURS)))
    if task == "add":
        src, tgt = finish(base, noise), finish(edited, noise)
        text = {"instruction": f"Add a {colour} {shape} to Picture 1",
                "instruction_cn": f"在图1中添加一个{COLOURS_CN[colour]}的{SHAPES_CN[shape]}",
                "inverse_instruction": f"Remove the {colour} {shape} from Picture 1",
                "inverse_instruction_cn": f"移除图1中{COLOURS_CN[colour]}的{SHAPES_CN[shape]}"}
    else:
        src, tgt = finish(edited, noise), finish(base, noise)
        text = {"instruction": f"Remove the {colour} {shape} from Picture 1",
                "instruction_cn": f"移除图1中{COLOURS_CN[colour]}的{SHAPES_CN[shape]}",
                "inverse_instruction": f"Add a {colour} {shape} to Picture 1",
                "inverse_instruction_cn": f"在图1中添加一个{COLOURS_CN[colour]}的{SHAPES_CN[shape]}"}
    return src, tgt, text


def qr_image(text: str, side: int) -> Image.Image:
    import cv2

    code = cv2.QRCodeEncoder.create().encode(text)
    return Image.fromarray(code).convert("RGB").resize((side, side), Image.NEAREST)


_EAN_L = ["0001101", "0011001", "0010011", "0111101", "0100011", "0110001", "0101111", "0111011", "0110111",
          "0001011"]
_EAN_G = ["0100111", "0110011", "0011011", "0100001", "0011101", "0111001", "0000101", "0010001", "0001001",
          "0010111"]
_EAN_FIRST = ["LLLLLL", "LLGLGG", "LLGGLG", "LLGGGL", "LGLLGG", "LGGLLG", "LGGGLL", "LGLGLG", "LGLGGL", "LGGLGL"]


def ean13_image(digits12: str, module: int, height: int) -> Image.Image:
    """An EAN-13 barcode (check digit computed) with quiet zones, black bars on white."""
    d = [int(c) for c in digits12]
    check = (10 - (sum(d[0::2]) + 3 * sum(d[1::2])) % 10) % 10
    d.append(check)
    bits = "101"
    for i, parity in enumerate(_EAN_FIRST[d[0]]):
        bits += (_EAN_L if parity == "L" else _EAN_G)[d[1 + i]]
    bits += "01010"
    for x in d[7:]:
        bits += "".join("1" if b == "0" else "0" for b in _EAN_L[x])
    bits += "101"
    bits = "0" * 9 + bits + "0" * 9
    row = np.array([0 if b == "1" else 255 for b in bits], dtype=np.uint8).repeat(module)
    return Image.fromarray(np.tile(row, (height, 1))).convert("RGB")


def plant(kind: str, img: Image.Image, rng: np.random.Generator, other: Image.Image | None = None) -> Image.Image:
    """Apply one image-level defect to ``img``."""
    w, h = img.size
    arr = np.asarray(img, dtype=np.float32)
    if kind == "overexposed":
        return Image.fromarray(np.clip(arr * 1.5 + 110, 0, 255).astype(np.uint8))  # blown highlights
    if kind == "underexposed":
        return Image.fromarray(np.clip(arr * 0.15, 0, 255).astype(np.uint8))
    if kind == "desaturated":
        g = arr.mean(axis=2, keepdims=True)
        return Image.fromarray((g + 0.08 * (arr - g)).astype(np.uint8))
    if kind == "blurred":
        return img.filter(ImageFilter.GaussianBlur(2.5))
    if kind == "colour_cast":  # a white-balance error: strong gains per channel in linear light
        from .photos import defect

        return Image.fromarray(defect(np.asarray(img), "colour_cast", 0.25, rng))
    if kind == "noise":
        return Image.fromarray(np.clip(arr + rng.normal(0, 12, (h, w, 1)), 0, 255).astype(np.uint8))
    if kind == "heavy_jpeg":
        return jpeg(img, 5)
    if kind in ("text", "logo"):
        out = img.convert("RGBA")
        layer = Image.new("RGBA", out.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(layer)
        font = ImageFont.load_default(size=max(10, h // 9))
        if kind == "text":
            colour = (255, 255, 255, 255) if rng.random() < 0.5 else (0, 0, 0, 255)
            draw.text((int(0.05 * w), int(rng.uniform(0.2, 0.7) * h)), "SAMPLE TEXT 2024", font=font, fill=colour)
        else:
            draw.text((int(0.3 * w), int(0.8 * h)), "(c) stock", font=font, fill=(255, 255, 255, 150))
            r = h // 8
            draw.ellipse((int(0.08 * w), int(0.78 * h), int(0.08 * w) + r, int(0.78 * h) + r),
                         outline=(255, 255, 255, 150), width=2)
        return Image.alpha_composite(out, layer).convert("RGB")
    if kind == "mosaic":
        b = int(rng.integers(6, 12))
        return img.resize((max(1, w // b), max(1, h // b)), Image.BILINEAR).resize((w // b * b, h // b * b),
                                                                                   Image.NEAREST)
    if kind == "collage":
        out = img.copy()
        half = other.resize((w // 2, h))
        out.paste(half, (w // 2, 0))
        return out
    if kind in ("qr", "barcode"):
        out = img.copy()
        side = int(0.55 * min(w, h))
        code = qr_image(f"https://example.com/{rng.integers(1e6)}", side) if kind == "qr" else \
            ean13_image("".join(str(v) for v in rng.integers(0, 10, 12)), max(1, w // 100), side // 2)
        code.thumbnail((int(0.9 * w), int(0.9 * h)))
        out.paste(code, ((w - code.width) // 2, (h - code.height) // 2))
        return out
    raise ValueError(f"unknown defect {kind!r}")


def _copy(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """A near-duplicate copy of ``img`` under one transformation."""
    w, h = img.size
    if kind == "exact_dup":
        return img.copy()
    if kind == "dup_resize":
        return img.resize((w * 3 // 4, h * 3 // 4), Image.BICUBIC)
    if kind == "dup_jpeg":
        return jpeg(img, 40)
    if kind == "dup_crop":
        m = max(1, w // 32)
        return img.crop((m, m, w - m, h - m))
    if kind == "dup_jitter":
        arr = np.asarray(img, dtype=np.float32)
        return Image.fromarray(np.clip((arr - 128) * 0.85 + 128 + rng.uniform(-12, 12, 3), 0, 255).astype(np.uint8))
    raise ValueError(kind)


def make_planted(root: str | Path, clean: int = 40, per_defect: int = 3, size: int = 128, seed: int = 0,
                 defects: list[str] | None = None, masks: int = 0) -> dict[str, str]:
    """Write a planted set: rows under ``root/data/<task>/data.jsonl`` (tasks add, remove, style; the pipeline's
    input is ``root/data``), ``root/truth.json`` and, when ``masks`` > 0, ``root/masks/masks.jsonl``
    (image, mask, label records for the mask_pairs stage). Returns uid -> class.
    """
    top = Path(root)
    root = top / "data"
    rng = np.random.default_rng(seed)
    kinds = defects if defects is not None else [d for group in DEFECTS.values() for d in group]
    tasks = ["add", "remove", "style"]
    lines: dict[str, list[str]] = {t: [] for t in tasks}
    truth: dict[str, str] = {}
    clean_rows: list[tuple[str, Image.Image, Image.Image, dict]] = []

    def save(task: str, name: str, src: Image.Image, tgt: Image.Image, text: dict, label: str) -> None:
        folder = root / task / "img"
        folder.mkdir(parents=True, exist_ok=True)
        src.save(folder / f"{name}_src.png")
        tgt.save(folder / f"{name}_tgt.png")
        row = {"source_image": f"img/{name}_src.png", "target_image": f"img/{name}_tgt.png", **text}
        lines[task].append(json.dumps(row, ensure_ascii=False))
        truth[f"{task}/data:{len(lines[task])}"] = label

    for i in range(clean):
        task = tasks[i % 3] if i % 6 else "style"
        w = size if i % 4 else size * 5 // 4
        src, tgt, text = clean_pair(rng, w, size, task)
        save(task, f"clean{i:04d}", src, tgt, text, "clean")
        clean_rows.append((task, src, tgt, text))
    n = 0
    for kind in kinds:
        for _ in range(per_defect):
            task = ["add", "remove"][n % 2]
            n += 1
            name = f"{kind}{n:04d}"
            if kind in DEFECTS["dedup"]:
                task, src, tgt, text = clean_rows[(n * 7) % len(clean_rows)]
                save(task, name, _copy(src, kind, rng), _copy(tgt, kind, rng), text, kind)
                continue
            src, tgt, text = clean_pair(rng, size, size, task)
            if kind == "trivial":
                tgt = jpeg(src, 95) if n % 2 else src.copy()
            elif kind == "unrelated":
                tgt = finish(base_scene(rng, size, size), texture(rng, size, size))
            elif kind == "mosaic":
                src, tgt = plant(kind, src, rng), plant(kind, tgt, rng)
            elif kind == "collage":  # the target pasted together with half of another picture
                tgt = plant(kind, tgt, rng, finish(base_scene(rng, size, size), texture(rng, size, size)))
            else:
                tgt = plant(kind, tgt, rng)
            save(task, name, src, tgt, text, kind)
    for task, rows in lines.items():
        if rows:
            (root / task / "data.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    if masks:
        write_masks(top / "masks", masks, size, rng)
    write_json(top / "truth.json", truth)
    return truth


def write_masks(folder: Path, count: int, size: int, rng: np.random.Generator) -> Path:
    """(image, mask, label) records: a scene with one labelled shape and its binary mask."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        base, noise = base_scene(rng, size, size), texture(rng, size, size)
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(list(SHAPES_CN)))
        box = _box(rng, size, size, 0.25, 0.4)
        mask = Image.new("L", (size, size), 0)
        _draw_shape(ImageDraw.Draw(mask), shape, box, 255)
        _draw_shape(ImageDraw.Draw(base), shape, box, COLOURS[colour])
        finish(base, noise).save(folder / f"obj{i:03d}.png")
        mask.save(folder / f"obj{i:03d}_mask.png")
        lines.append(json.dumps({"image": f"obj{i:03d}.png", "mask": f"obj{i:03d}_mask.png",
                                 "label": f"{colour} {shape}", "label_cn": f"{COLOURS_CN[colour]}的{SHAPES_CN[shape]}"},
                                ensure_ascii=False))
    path = folder / "masks.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
