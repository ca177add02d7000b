"""Shared fixtures: the tiny random model of the real architecture, built once per test session."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from firered_core.demo_models import build_model

    return build_model(tmp_path_factory.mktemp("models") / "tiny", "tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from firered_core.model import load_model

    return load_model(tiny_model_dir)


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A smooth random picture (gradients + noise), deterministic for a seed."""
    rs = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x / max(width - 1, 1)), (y / max(height - 1, 1)), rs.rand(height, width) * 0.3], -1)
    arr = (np.clip(base + rs.rand(1, 1, 3) * 0.5, 0, 1) * 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    return img if mode == "RGB" else img.convert(mode)


@pytest.fixture
def make_image():
    return random_image
