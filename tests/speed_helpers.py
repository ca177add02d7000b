"""Small edits on the tiny model shared by the speed tests (64x64 output, 128x128 VAE area, few steps)."""

from __future__ import annotations

import torch

from firered_core.model import load_model
from firered_core.pipeline import EditPipeline
from firered_core.speed import ModelSettings, RunSettings

EDIT = dict(width=64, height=64, vae_area=128 * 128, vl_area=128 * 128, true_cfg=4.0, seed=3, output="latent")
PROMPT = "make the sky a deep orange sunset"


def fresh_model(model_dir, settings: ModelSettings | None = None, **kw):
    """A model of its own: speed options change components in place, so never the shared fixture."""
    return load_model(model_dir, settings=settings, **kw)


def edit(model, image, run: RunSettings | None = None, steps: int = 3, **kw):
    args = {**EDIT, "steps": steps, **kw}
    return EditPipeline(model, run).edit([image], PROMPT, **args)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())
