"""Row-scaled fp8 and int8 matmuls with dynamic per-token activation scales.

``y = (x_q * s_x) @ (w_q * s_w).T + b`` where ``w_q`` has one scale per output channel (``s_w``: [1, N]) and ``x_q``
one per token (``s_x``: [M, 1]), computed from the token's absolute maximum at call time. The product runs in
fp8 (``torch._scaled_mm``, compute capability >= 8.9) or int8 with int32 accumulation (``torch._int_mm``, CUDA and
CPU); the scales are applied to the fp32 / int32 accumulator. ``emulate=True`` computes the same quantised values
with a float matmul, the reference the tests hold the fast kernels to (and the fp8 path on hardware without fp8).
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)
# Shape rules of the kernels: fp8 wants K and N multiples of 16; int8 on CUDA wants K, N multiples of 8 and M > 16.
_PAD_M = 32


_CAPABILITY: dict[int, tuple[int, int]] = {}


def cuda_capabilities() -> dict[int, tuple[int, int]]:
    """Compute capability of every visible CUDA device, read once (so a compiled forward only reads a dict)."""
    if not _CAPABILITY and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            _CAPABILITY[i] = torch.cuda.get_device_capability(i)
    return _CAPABILITY


def _capability(device: torch.device) -> tuple[int, int]:
    caps = cuda_capabilities()
    return caps.get(device.index or 0, (0, 0))  # a tensor's CUDA device always has its index


def fp8_matmul_supported(device: torch.device | str) -> bool:
    device = torch.device(device)
    return device.type == "cuda" and hasattr(torch, "_scaled_mm") and _capability(device) >= (8, 9)


def int8_matmul_supported(device: torch.device | str) -> bool:
    device = torch.device(device)
    if not hasattr(torch, "_int_mm"):
        return False
    return device.type == "cpu" or (device.type == "cuda" and _capability(device) >= (8, 0))


def shape_fits(mode: str, in_features: int, out_features: int) -> bool:
    """Whether a weight of this shape can run on the ``mode`` kernel (else the layer stays on the fallback)."""
    step = 16 if mode == "fp8" else 8
    return in_features % step == 0 and out_features % step == 0


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [M, K] -> (fp8 e4m3 values, float32 scales [M, 1]) with ``x ~= q * scale`` row by row."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12)
    scale = amax / FP8_MAX
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [M, K] -> (int8 values in [-127, 127], float32 scales [M, 1]) with ``x ~= q * scale`` row by row."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12)
    scale = amax / 127.0
    q = (x.float() / scale).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def _pad_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    m = x.shape[0]
    if m >= _PAD_M and m % 16 == 0:
        return x, m
    target = max(_PAD_M, -(-m // 16) * 16)
    return torch.nn.functional.pad(x, (0, 0, 0, target - m)), m


def scaled_fp8_linear(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, bias: torch.Tensor | None,
                      emulate: bool = False) -> torch.Tensor:
    """``x`` [..., K] (bf16/fp16/fp32) times fp8 ``qweight`` [N, K] with float32 ``wscale`` [1, N]; out in x's dtype."""
    shape = x.shape
    x2, m = _pad_rows(x.reshape(-1, shape[-1]))
    xq, xs = quantize_rows_fp8(x2)
    if emulate:
        out = ((xq.float() @ qweight.float().t()) * xs * wscale).to(x.dtype)
        if bias is not None:
            out = out + bias.to(x.dtype)
    else:
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        out = torch._scaled_mm(xq, qweight.t(), scale_a=xs, scale_b=wscale, out_dtype=out_dtype).to(x.dtype)
        if bias is not None:
            out = out + bias.to(x.dtype)
    return out[:m].reshape(*shape[:-1], qweight.shape[0])


def scaled_int8_linear(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, bias: torch.Tensor | None,
                       emulate: bool = False) -> torch.Tensor:
    """``x`` [..., K] times int8 ``qweight`` [N, K], float32 ``wscale`` [1, N]; int32 accumulation, out in x's dtype.

    The int32 accumulator is exact, so the emulation (float64 products of the same integers) equals the kernel.
    """
    shape = x.shape
    x2, m = _pad_rows(x.reshape(-1, shape[-1]))
    xq, xs = quantize_rows_int8(x2)
    if emulate:
        acc = (xq.double() @ qweight.double().t()).float()
    else:
        acc = torch._int_mm(xq, qweight.t()).float()
    out = (acc * xs * wscale).to(x.dtype)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out[:m].reshape(*shape[:-1], qweight.shape[0])
