"""Fast runtime GGUF decode: each block kernel of ``formats.gguf.kernels`` compiled into one fused GPU kernel.

The eager torch kernels run a dozen elementwise ops per weight, each a pass over memory in float32, which made a
runtime GGUF linear cost 2-3x a bf16 one. Compiled (inductor), the decode is one kernel that reads the packed bytes
once and writes the weight in the compute dtype once; the matmul then runs on cuBLAS. The decoded weight of one
layer lives only while that layer runs (the caching allocator reuses its block for the next layer). Same arithmetic
as the eager kernels in float32 (the cast comes last), so outputs agree to float32 rounding; benchmarks/gpu.py
measures Q8_0 / Q4_K layers against a bf16 Linear.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..formats.gguf.kernels import BLOCKS, KERNELS, dequantize

_compiled: dict[tuple, Callable] = {}


def _decoder(qtype: int, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    nbytes = BLOCKS[qtype][2]
    kernel = KERNELS[qtype]

    def decode(packed: torch.Tensor) -> torch.Tensor:
        return kernel(packed.reshape(-1, nbytes)).to(dtype)

    return decode


def compiled_decoder(qtype: int, dtype: torch.dtype, backend: str = "inductor") -> Callable:
    """The decode of ``qtype`` into ``dtype`` as one compiled function of the packed bytes (cached per key)."""
    key = (int(qtype), dtype, backend)
    if key not in _compiled:
        _compiled[key] = torch.compile(_decoder(int(qtype), dtype), backend=backend, fullgraph=True, dynamic=True)
    return _compiled[key]


def fast_dequantize(packed: torch.Tensor, qtype: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """:func:`~firered_core.formats.gguf.kernels.dequantize`, compiled on CUDA; the eager kernels elsewhere (and
    inside an enclosing ``torch.compile``, which fuses them itself)."""
    if packed.device.type != "cuda" or torch.compiler.is_compiling() or int(qtype) not in KERNELS:
        return dequantize(packed, qtype, shape, dtype)
    return compiled_decoder(qtype, dtype)(packed).reshape(shape)
