"""Runtime GGUF: a Linear that keeps its weight as the file's packed blocks and decodes it at every call.

A Q4 20B transformer then needs about its file size in memory instead of its bf16 size; the decoded weight of one
layer exists only while that layer runs. Conversion code (reading, renaming, dequantise-at-load) lives elsewhere in
``formats``; this module is only what runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import dequantize, packed_nbytes, qtype_name


class GGUFLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored as packed GGUF bytes (``qweight``, uint8) of type ``qtype``.

    ``W`` is decoded in torch on ``qweight``'s device, in float32 then cast to the input's dtype, so the output equals
    a Linear holding the dequantised-at-load weight. ``bias`` stays a normal float parameter. Moving the module moves
    the packed bytes; ``.to(dtype)`` changes :attr:`compute_dtype` (tracked by an empty float buffer) and the bias.
    """

    def __init__(self, qweight: torch.Tensor, qtype: int, out_features: int, in_features: int,
                 bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        expected = packed_nbytes(qtype, (out_features, in_features))
        if qweight.dtype != torch.uint8 or qweight.numel() != expected:
            raise ValueError(f"{qtype_name(qtype)} weight [{out_features}, {in_features}] needs {expected} uint8 "
                             f"bytes, got {qweight.numel()} {qweight.dtype}")
        self.qtype = int(qtype)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.register_buffer("qweight", qweight.reshape(out_features, -1))
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
        self.register_buffer("dtype_anchor", torch.empty(0, dtype=dtype), persistent=False)

    @property
    def qtype_name(self) -> str:
        return qtype_name(self.qtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.dtype_anchor.dtype

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The decoded ``[out, in]`` weight in ``dtype`` (default :attr:`compute_dtype`), on ``qweight``'s device."""
        return dequantize(self.qweight, self.qtype, self.weight_shape, dtype or self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The decoded weight (a fresh tensor each access: for code that reads ``.weight``; costs a full decode)."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ...kernels.gguf_fast import fast_dequantize

        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, fast_dequantize(self.qweight, self.qtype, self.weight_shape, x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype_name}, " \
               f"bias={self.bias is not None}"
