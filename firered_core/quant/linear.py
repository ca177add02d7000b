"""Linear layers whose matmul runs in fp8 / int8 where the device has the kernel, else by dequantising the weight.

:class:`FastQuantLinear` is a :class:`~firered_core.memory.QuantLinear` (same buffers, same ``weight`` property for
LoRA wrappers, same fallback ``forward``) with an exact float32 per-output-channel scale and a low-precision path:
activations are quantised per token at call time and multiplied on the fp8 / int8 units
(:mod:`firered_core.quant.matmul`). It is chosen per call from the input's device, so a model moved between a CPU
and a GPU keeps working. :meth:`FastQuantLinear.from_fp8` builds one directly from a file's fp8 weight and scale
(ComfyUI "fp8_scaled"), with no full-precision copy ever made.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .weight import QuantLinear
from .matmul import (FP8, cuda_capabilities, fp8_matmul_supported, int8_matmul_supported, scaled_fp8_linear,
                     scaled_int8_linear, shape_fits)

log = logging.getLogger(__name__)


class FastQuantLinear(QuantLinear):
    """``QuantLinear`` plus an fp8 (``torch._scaled_mm``) or int8 (``torch._int_mm``) matmul path.

    ``emulate`` (class or instance attribute) runs the low-precision path's arithmetic with float matmuls on any
    device: the reference the tests compare the kernels with.
    """

    emulate = False
    from_file = False  # True for a weight kept as a file's own fp8 tensor (:meth:`from_fp8`)

    def __init__(self, linear: nn.Linear, mode: str):
        super().__init__(linear, mode)
        w = linear.weight.detach()
        amax = w.abs().amax(dim=1).float().clamp_min(1e-12)
        limit = 127.0 if mode == "int8" else float(torch.finfo(FP8).max)
        self.register_buffer("wscale", (amax / limit).reshape(1, -1))
        cuda_capabilities()

    @classmethod
    def from_fp8(cls, qweight: torch.Tensor, scale: torch.Tensor | float, bias: torch.Tensor | None,
                 dtype: torch.dtype) -> "FastQuantLinear":
        """A layer over a stored e4m3 weight [N, K] and its scale (one per tensor or one per output row)."""
        if qweight.dtype != FP8 or qweight.dim() != 2:
            raise ValueError(f"expected a 2-D float8_e4m3fn weight, got {qweight.dtype} {tuple(qweight.shape)}")
        n, k = qweight.shape
        scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
        if scale.numel() not in (1, n):
            raise ValueError(f"an fp8 weight [{n}, {k}] needs 1 or {n} scales, got {scale.numel()}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.mode, layer.in_features, layer.out_features, layer.compute_dtype = "fp8", k, n, dtype
        layer.register_buffer("qweight", qweight)
        wscale = scale.expand(n).reshape(1, n).clone()
        layer.register_buffer("scale", wscale.reshape(n, 1).to(dtype))
        layer.register_buffer("wscale", wscale)
        layer.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        layer.from_file = True
        cuda_capabilities()
        return layer

    def fast_path(self, device: torch.device) -> bool:
        """Whether a call on ``device`` runs the low-precision matmul (else the dequantise fallback)."""
        if not shape_fits(self.mode, self.in_features, self.out_features):
            return False
        if self.emulate:
            return True
        return _kernel(self.mode, device)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as the fallback multiplies it: widened and scaled in float32, then cast once, so a file's fp8
        weight gives exactly the values dequantise-at-load gives (``formats.dequant``) in every compute dtype."""
        return (self.qweight.float() * self.wscale.reshape(-1, 1)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast_path(x.device):
            return F.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        fn = scaled_fp8_linear if self.mode == "fp8" else scaled_int8_linear
        return fn(x, self.qweight, self.wscale, self.bias, emulate=self.emulate)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", matmul=low-precision"


def log_matmul_path(module: nn.Module, device: torch.device | str) -> int:
    """One log line when some :class:`FastQuantLinear` layers of ``module`` cannot run their low-precision matmul on
    ``device`` (no fp8 / int8 kernel there, or a shape the kernel refuses) and dequantise per call instead; returns
    how many do."""
    device = torch.device(device)
    layers = [m for m in module.modules() if isinstance(m, FastQuantLinear)]
    slow = [m for m in layers if not m.fast_path(device)]
    if slow:
        modes = sorted({m.mode for m in slow})
        why = ", ".join(f"{m} matmul {'available' if _kernel(m, device) else 'unavailable'}" for m in modes)
        log.info("%d of %d %s-weight layers dequantise their weight per call on %s (%s; the same result as "
                 "dequantising at load, without its memory)", len(slow), len(layers), "/".join(modes), device, why)
    return len(slow)


def _kernel(mode: str, device: torch.device) -> bool:
    return fp8_matmul_supported(device) if mode == "fp8" else int8_matmul_supported(device)
