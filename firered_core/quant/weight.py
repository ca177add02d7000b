"""Weight-only quantisation: int8 / fp8-e4m3 weights with a per-output-channel scale, dequantised per call.

Half the weight memory of bf16 with the matmul itself unchanged; the fast layers in :mod:`.linear` extend it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError


class QuantLinear(torch.nn.Module):
    """A Linear whose weight is int8 or fp8-e4m3 with a per-output-channel scale (weight-only quantisation)."""

    def __init__(self, linear: torch.nn.Linear, mode: str):
        super().__init__()
        if mode not in ("int8", "fp8"):
            raise InputError(f"quantisation {mode!r} is not int8 or fp8", field="quantize")
        w = linear.weight.detach()
        amax = w.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12)
        if mode == "int8":
            scale = amax / 127.0
            q = (w.float() / scale).round().clamp(-127, 127).to(torch.int8)
        else:
            scale = amax / torch.finfo(torch.float8_e4m3fn).max
            q = (w.float() / scale).to(torch.float8_e4m3fn)
        self.mode = mode
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = w.dtype
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(w.dtype))
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (for code that reads ``.weight``, e.g. LoRA wrappers checking shape/dtype)."""
        return self.qweight.to(self.scale.dtype) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.qweight.to(x.dtype) * self.scale.to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, mode={self.mode}"
