"""Turn stored tensors (fp8, ComfyUI "scaled" fp8, GGUF quantisations) into compute-dtype tensors (GGUF blocks are
decoded by :mod:`firered_core.formats.gguf.kernels` when the GGUF reader is indexed).

Error bounds (relative to the largest magnitude in the tensor or block they come from; stated so tests can check):

- fp8 e4m3fn: 3 mantissa bits, relative rounding error <= 2**-4 per element (normal range); e5m2: <= 2**-3.
- ComfyUI scaled fp8: the same, relative to ``weight * scale``; the scale is applied in float32.
- GGUF Q8_0: per 32-value block ``|w - q| <= amax / 254`` (+ fp16 rounding of the scale); Q4_0: ``<= amax / 16``
  except the one bin clipped at +7, ``<= amax / 8``; K-quants are decoded exactly by
  the ``gguf`` package's reference dequantiser (the error is whatever the file's quantiser chose).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .checkpoint import Checkpoint

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
AUX_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
MARKER_KEYS = ("scaled_fp8", "__index_timestep_zero__")


def is_aux_key(key: str) -> bool:
    """Keys that describe another tensor (scales, quant descriptors) or flag the file, not weights of the model."""
    tail = key.rsplit(".", 1)[-1]
    return (key.endswith(SCALE_SUFFIXES) or key.endswith(AUX_SUFFIXES) or tail in MARKER_KEYS
            or tail.startswith("__"))


def weight_scale_key(ckpt: Checkpoint, key: str) -> str | None:
    """The per-tensor scale of a ComfyUI scaled-fp8 weight, if the file has one."""
    if not key.endswith(".weight"):
        return None
    base = key[: -len(".weight")]
    for suffix in SCALE_SUFFIXES:
        if base + suffix in ckpt:
            return base + suffix
    return None


def iter_dequantized(ckpt: Checkpoint, dtype: torch.dtype, rename: Callable[[str], str | None] = lambda k: k,
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(new_key, tensor)`` for every weight of ``ckpt`` in ``dtype``, skipping scale / marker keys.

    fp8 weights are widened to float32, multiplied by their per-tensor scale when the file has one (ComfyUI
    ``scale_weight`` / ``weight_scale``), then cast. Integer tensors are passed through. ``rename`` maps a file key
    to a model key, or None to drop it.
    """
    for key in ckpt:
        if is_aux_key(key):
            continue
        new = rename(key)
        if new is None:
            continue
        tensor = ckpt[key]
        if tensor.dtype in FP8_DTYPES or tensor.is_floating_point():
            scale_key = weight_scale_key(ckpt, key)
            if scale_key is not None:
                scale = ckpt[scale_key].to(torch.float32)
                if scale.numel() != 1:
                    scale = scale.reshape(-1, *([1] * (tensor.dim() - 1)))
                tensor = tensor.to(torch.float32) * scale
            elif tensor.dtype in FP8_DTYPES:
                tensor = tensor.to(torch.float32)
            tensor = tensor.to(dtype)
        if tensor.data_ptr() % 64:
            # Tensors read at unaligned file offsets take other SIMD paths than freshly allocated ones (last-ulp
            # differences); a copy makes a lossless load bit-identical to the original model.
            tensor = tensor.clone()
        yield new, tensor
