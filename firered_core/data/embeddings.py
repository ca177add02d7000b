"""A user's image model as a copy-detection descriptor: pooled penultimate features, L2-normalised.

Local files only: a model built by name with random weights, then the user's checkpoint loaded into it (a
safetensors file or a weights-only state dict: nothing is unpickled, nothing is downloaded; the Hugging Face hub is
switched off while a model is built). Three libraries, each used only when installed:

- ``torchvision``: ``torchvision.models.get_model(arch, weights=None)``; the last Linear layer becomes identity.
- ``timm``: ``timm.create_model(arch, pretrained=False)``, then ``reset_classifier(0)`` (pooled features);
  normalised with the architecture's own mean / std.
- ``open_clip``: ``open_clip.create_model(arch, pretrained=None)`` (``arch``: a config name, or a model-config
  .json file of one's own); the descriptor is ``encode_image``, normalised with the model's preprocess mean / std.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .config import EmbeddingConfig
from .extras import DataToolError, require
from .imageops import resize_to, to_tensor

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _state_dict(path: Path) -> dict:
    if not path.is_file():
        raise DataToolError(f"embedding.weights: file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is the same user error
        raise DataToolError(f"embedding.weights: cannot read {path} as a weights-only state dict: {exc}") from None
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


def _load(model: torch.nn.Module, cfg: EmbeddingConfig) -> None:
    """The user's weights into ``model``: every parameter must fit (buffers counters aside)."""
    try:
        missing, unexpected = model.load_state_dict(_state_dict(Path(cfg.weights)), strict=False)
    except RuntimeError as exc:  # shapes that differ
        raise DataToolError(f"embedding.weights {cfg.weights} does not fit {cfg.library} {cfg.arch}: "
                            + "; ".join(line.strip() for line in str(exc).splitlines()[1:3])) from None
    if unexpected or [m for m in missing if "num_batches_tracked" not in m]:
        raise DataToolError(f"embedding.weights {cfg.weights} does not fit {cfg.library} {cfg.arch}: "
                            f"missing {missing[:5]}, unexpected {unexpected[:5]}")


@contextmanager
def _offline() -> Iterator[None]:
    """Building a model by name never reaches the Hugging Face hub."""
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({k: "1" for k in old})
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _torchvision(cfg: EmbeddingConfig) -> tuple[torch.nn.Module, Callable, tuple]:
    import torchvision

    try:
        model = torchvision.models.get_model(cfg.arch, weights=None)
    except ValueError as exc:
        raise DataToolError(f"embedding.arch: {exc}") from None
    _load(model, cfg)
    last = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if last:
        parent, _, leaf = last[-1].rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, torch.nn.Identity())
    return model, model, IMAGENET


def _timm(cfg: EmbeddingConfig) -> tuple[torch.nn.Module, Callable, tuple]:
    timm = require("timm", "embedding.library: timm")
    try:
        model = timm.create_model(cfg.arch, pretrained=False)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise DataToolError(f"embedding.arch: {exc}") from None
    _load(model, cfg)
    model.reset_classifier(0)
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    return model, model, (tuple(pcfg.get("mean", IMAGENET[0])), tuple(pcfg.get("std", IMAGENET[1])))


def _open_clip(cfg: EmbeddingConfig) -> tuple[torch.nn.Module, Callable, tuple]:
    open_clip = require("open_clip", "embedding.library: open_clip")
    name = cfg.arch
    if name.endswith(".json"):  # a config of one's own: registered under its file stem
        path = Path(name)
        if not path.is_file():
            raise DataToolError(f"embedding.arch: model config {path} not found")
        open_clip.add_model_config(path)
        name = path.stem
    if open_clip.get_model_config(name) is None:
        raise DataToolError(f"embedding.arch: open_clip has no model config '{name}' (a name from "
                            f"open_clip.list_models(), or a model-config .json file)")
    model = open_clip.create_model(name, pretrained=None, pretrained_text=False)
    _load(model, cfg)
    pre = getattr(model.visual, "preprocess_cfg", {}) or {}
    return model, model.encode_image, (tuple(pre.get("mean", IMAGENET[0])), tuple(pre.get("std", IMAGENET[1])))


BUILDERS = {"torchvision": _torchvision, "timm": _timm, "open_clip": _open_clip}


class EmbeddingModel:
    def __init__(self, cfg: EmbeddingConfig):
        with _offline():
            model, self.forward, (mean, std) = BUILDERS[cfg.library](cfg)
        self.model = model.eval().to(cfg.device)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.cfg = cfg

    def preprocess(self, arr: np.ndarray) -> torch.Tensor:
        """uint8 RGB -> the normalised [1, 3, size, size] batch the model sees."""
        return (to_tensor(resize_to(arr, (self.cfg.size, self.cfg.size))) - self.mean) / self.std

    @torch.no_grad()
    def __call__(self, arr: np.ndarray) -> list[float]:
        feat = self.forward(self.preprocess(arr).to(self.cfg.device)).flatten(1).float().cpu()[0]
        return (feat / (feat.norm() + 1e-12)).tolist()
