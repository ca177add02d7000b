"""Validation during training: edits of the first rows with the inference pipeline, laid out as one grid image."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from ..images import load_image
from .buckets import bucket_key
from .config import TrainConfig
from .rows import row_images


def validation_rows(pipe, samples, cfg: TrainConfig) -> list[list[Image.Image]]:
    """For each sample: its sources, its target, and the pipeline's edit at the sample's training size."""
    val = cfg.validation
    rows = []
    for sample in samples[: val.rows]:
        images = row_images(sample, bucket_key(sample), cfg.target_area, cfg.reference_area)
        sources = [load_image(p) for p in sample.sources]
        w, h = images.target_size
        result = pipe.edit(sources, sample.instruction, steps=val.steps, true_cfg=val.true_cfg, seed=val.seed,
                           width=w, height=h, vl_area=cfg.vl_area, vae_area=cfg.reference_area,
                           prompt_mode=cfg.prompt_mode)
        rows.append([*sources, load_image(sample.target), result.images[0]])
    return rows


def image_grid(rows: list[list[Image.Image]], height: int = 128) -> Image.Image:
    """One row per example (sources, target, output), each picture scaled to ``height``."""
    scaled = [[im.resize((max(1, round(im.width * height / im.height)), height)) for im in row] for row in rows]
    width = max(sum(im.width for im in row) for row in scaled)
    grid = Image.new("RGB", (width, height * len(scaled)), "white")
    for r, row in enumerate(scaled):
        x = 0
        for im in row:
            grid.paste(im, (x, r * height))
            x += im.width
    return grid


def save_grid(grid: Image.Image, out: Path, step: int, trackers=()) -> Path:
    """Write ``validation/step-<step>.png`` under ``out`` and hand the grid to every tracker that logs images."""
    import numpy as np

    path = out / "validation" / f"step-{step:08d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    for tracker in trackers:
        if hasattr(tracker, "log_images"):
            tracker.log_images({"validation": np.asarray(grid)[None]}, step=step, dataformats="NHWC")
    return path
