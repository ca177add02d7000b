"""A user's image model as a copy-detection descriptor: penultimate features, L2-normalised.

Local files only: a torchvision architecture by name plus a safetensors file or a weights-only state dict (nothing
is unpickled, nothing is downloaded). The classifier head (the last Linear layer) is replaced by identity.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .config import EmbeddingConfig
from .extras import DataToolError
from .imageops import resize_to, to_tensor

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


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


class EmbeddingModel:
    def __init__(self, cfg: EmbeddingConfig):
        import torchvision

        try:
            model = torchvision.models.get_model(cfg.arch, weights=None)
        except ValueError as exc:
            raise DataToolError(f"embedding.arch: {exc}") from None
        missing, unexpected = model.load_state_dict(_state_dict(Path(cfg.weights)), strict=False)
        if unexpected or [m for m in missing if "num_batches_tracked" not in m]:
            raise DataToolError(f"embedding.weights {cfg.weights} does not fit torchvision {cfg.arch}: "
                                f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        last = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        if last:
            parent, _, leaf = last[-1].rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, torch.nn.Identity())
        self.model = model.eval().to(cfg.device)
        self.cfg = cfg

    @torch.no_grad()
    def __call__(self, arr: np.ndarray) -> list[float]:
        x = to_tensor(resize_to(arr, (self.cfg.size, self.cfg.size)))
        feat = self.model(((x - MEAN) / STD).to(self.cfg.device)).flatten(1).float().cpu()[0]
        return (feat / (feat.norm() + 1e-12)).tolist()
