"""A small synthetic edit data set in FireRed's layout, for tests and benchmarks.

Each source is a random arrangement of coloured blocks; its target is the same picture with the colour channels
rotated (a global, learnable colour edit). Multi-source rows compose the sources side by side.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def blocks(rng: np.random.Generator, width: int, height: int, cells: int = 4) -> np.ndarray:
    grid = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(grid).resize((width, height), Image.NEAREST))
    return img


def recolour(arr: np.ndarray) -> np.ndarray:
    return arr[..., [1, 2, 0]]


def make_dataset(root: str | Path, rows: int = 8, sizes: tuple[tuple[int, int], ...] = ((64, 64),),
                 tasks: tuple[str, ...] = ("recolour",), sources: tuple[int, ...] = (1,), seed: int = 0,
                 rejected: bool = False, faces: bool = False) -> Path:
    """Write ``rows`` rows per task under ``root/<task>/data.jsonl`` with images beside them.

    ``rejected`` adds a dispreferred image per row (the unedited source: the hard negative of an edit that did
    nothing; colours inverted for text-to-image rows); ``faces`` adds one box, the target's top-left quarter.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for task in tasks:
        folder = root / task
        (folder / "img").mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(rows):
            w, h = sizes[i % len(sizes)]
            n = sources[i % len(sources)]
            srcs = [blocks(rng, w, h) for _ in range(n)]
            names = []
            for k, arr in enumerate(srcs):
                names.append(f"img/{i:04d}_src{k}.png")
                Image.fromarray(arr).save(folder / names[-1])
            tgt = recolour(srcs[0]) if n else blocks(rng, w, h)
            if n > 1:
                tgt = np.concatenate([recolour(srcs[0])[:, : w // 2], recolour(srcs[1])[:, w // 2:]], axis=1)
            Image.fromarray(np.ascontiguousarray(tgt)).save(folder / f"img/{i:04d}_tgt.png")
            text = "Rotate the colours of Picture 1" if n else "Coloured blocks"
            if n > 1:
                text = "Left half of Picture 1 and right half of Picture 2, colours rotated"
            row = {"source_image": (names[0] if n == 1 else names) if n else None,
                   "target_image": f"img/{i:04d}_tgt.png", "instruction": text,
                   "instruction_cn": "旋转图1的颜色" if n else "彩色方块"}
            if n == 1:
                row["inverse_instruction"] = "Rotate the colours of Picture 1 back"
            if rejected:
                Image.fromarray(np.ascontiguousarray(srcs[0] if n else 255 - tgt)).save(folder / f"img/{i:04d}_rej.png")
                row["rejected_image"] = f"img/{i:04d}_rej.png"
            if faces:
                row["faces"] = [[0, 0, w // 2, h // 2]]
            lines.append(json.dumps(row, ensure_ascii=False))
        (folder / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root
