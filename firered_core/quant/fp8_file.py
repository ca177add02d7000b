"""fp8 checkpoints (ComfyUI "fp8_scaled" or plain e4m3) kept in fp8: each Linear weight stays the file's fp8 tensor
inside a :class:`~firered_core.quant.FastQuantLinear` with the file's scale, so no full-precision copy is made and
the matmul runs on the fp8 path where the GPU has it (the dequantise fallback elsewhere equals dequantise-at-load).

Layers the quantisation keeps in full precision (``memory.KEEP_TRANSFORMER``) are dequantised at load as before, as
are e5m2 weights (``torch._scaled_mm`` takes e4m3 weights here).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..memory import KEEP_TRANSFORMER, _kept
from .linear import FastQuantLinear
from .matmul import FP8

FP8_MODES = ("load", "runtime")


def check_fp8_mode(mode: str) -> str:
    if mode not in FP8_MODES:
        raise ValueError(f"fp8_mode must be one of {FP8_MODES}, got {mode!r}")
    return mode


def fp8_weight_keys(ckpt, module: nn.Module, rename: Callable[[str], str | None],
                    keep: tuple[str, ...] = KEEP_TRANSFORMER) -> dict[str, str]:
    """``{model key: file key}`` of the e4m3 Linear weights of ``ckpt`` that stay fp8 in ``module``."""
    linears = {name for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    out = {}
    for key in ckpt:
        new = rename(key)
        if new is None or not new.endswith(".weight"):
            continue
        name = new[: -len(".weight")]
        if name in linears and not _kept(name, keep) and ckpt.dtype(key) == FP8:
            out[new] = key
    return out


def swap_in_fp8(ckpt, keys: Mapping[str, str], dtype: torch.dtype,
                scale_key: Callable[[object, str], str | None]) -> Callable[[nn.Module], None]:
    """A ``finish`` step for ``build_with_weights``: each Linear named in ``keys`` becomes a ``FastQuantLinear``
    over the file's fp8 tensor and its scale (1.0 when the file has none)."""

    def finish(module: nn.Module) -> None:
        for new, key in keys.items():
            name = new[: -len(".weight")]
            linear = module.get_submodule(name)
            sk = scale_key(ckpt, key)
            scale = ckpt[sk].to(torch.float32) if sk is not None else torch.ones(1)
            bias = None if linear.bias is None else linear.bias.detach()
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, FastQuantLinear.from_fp8(ckpt[key], scale, bias, dtype))

    return finish
