"""Quantised matmuls that run in low precision (fp8 ``torch._scaled_mm``, int8 ``torch._int_mm``).

``weight.QuantLinear`` (re-exported by ``memory``) stores int8 / fp8 weights and dequantises them per call (weight-only: saves memory, costs
time). The layers here keep the same interface and storage but quantise the activations too, per token and on the
fly, so the matmul itself runs on the low-precision units; where the hardware lacks them they fall back to the
dequantise path.
"""

from .matmul import (FP8_MAX, fp8_matmul_supported, int8_matmul_supported, quantize_rows_fp8,
                     quantize_rows_int8, scaled_fp8_linear, scaled_int8_linear)
from .linear import FastQuantLinear

__all__ = ["FP8_MAX", "FastQuantLinear", "fp8_matmul_supported", "int8_matmul_supported",
           "quantize_rows_fp8", "quantize_rows_int8", "scaled_fp8_linear", "scaled_int8_linear"]
