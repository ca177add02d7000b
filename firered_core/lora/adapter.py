"""The adapter layer: a Linear plus runtime low-rank adapters, and the model's Linear layers as LoRAs see them.

Layers kept packed by runtime GGUF (:class:`~firered_core.formats.GGUFLinear`) take LoRAs only as adapters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.gguf.linear import GGUFLinear


class LoraLinear(nn.Module):
    """A Linear plus runtime low-rank adapters, as a plain module (no hooks, so torch.compile traces it whole).

    ``base`` is the original Linear object, untouched; removing the adapters puts it back.
    """

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.adapters: list[tuple[float, str, str | None]] = []

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def add(self, scale: float, down: torch.Tensor | None, up: torch.Tensor) -> None:
        """``up @ down`` (or a full delta ``up`` when ``down`` is None), times ``scale``."""
        i = len(self.adapters)
        device, dtype = device_dtype(self.base)
        self.register_buffer(f"up_{i}", up.to(device, dtype), persistent=False)
        if down is not None:
            self.register_buffer(f"down_{i}", down.to(device, dtype), persistent=False)
        self.adapters.append((float(scale), f"up_{i}", f"down_{i}" if down is not None else None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for scale, up, down in self.adapters:
            h = F.linear(x, getattr(self, down)) if down is not None else x
            y = y + scale * F.linear(h, getattr(self, up))
        return y


def device_dtype(linear: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype a layer computes (without decoding a packed GGUF weight)."""
    if isinstance(linear, GGUFLinear):
        return linear.qweight.device, linear.compute_dtype
    return linear.weight.device, linear.weight.dtype


def weight_shape(linear: nn.Module) -> tuple[int, ...]:
    """A layer's ``[out, in]`` (a packed GGUF layer's logical shape)."""
    return linear.weight_shape if isinstance(linear, GGUFLinear) else tuple(linear.weight.shape)


def linear_modules(model: nn.Module) -> dict[str, nn.Linear | GGUFLinear]:
    """``{name: Linear}`` of the model (GGUFLinear included), seeing through :class:`LoraLinear` wrappers (named as
    the wrapped layer)."""
    out: dict[str, nn.Linear | GGUFLinear] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            out[name] = module.base
        elif isinstance(module, (nn.Linear, GGUFLinear)):
            parent, _, child = name.rpartition(".")
            if child == "base" and isinstance(model.get_submodule(parent), LoraLinear):
                continue
            out[name] = module
    return out


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
