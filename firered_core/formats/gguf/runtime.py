"""Loading side of runtime GGUF: choose which weights stay packed and put :class:`GGUFLinear` layers in their place.

``gguf_mode="runtime"`` (the default for GGUF transformers) keeps every quantised Linear weight that has a torch
kernel as its packed bytes; F32/F16/BF16 tensors, non-Linear tensors and types without a kernel are dequantised at
load as before. ``gguf_mode="load"`` dequantises everything at load (plain Linears, full-size memory).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..errors import FormatError
from .kernels import qtype_name, supported
from .linear import GGUFLinear

log = logging.getLogger(__name__)

GGUF_MODES = ("runtime", "load")


def check_gguf_mode(mode: str) -> str:
    if mode not in GGUF_MODES:
        raise ValueError(f"gguf_mode must be one of {GGUF_MODES}, got {mode!r}")
    return mode


def packed_weight_keys(ckpt: Checkpoint, module: nn.Module, rename: Callable[[str], str | None]) -> dict[str, str]:
    """``{model key: file key}`` of the quantised Linear weights of ``ckpt`` that stay packed in ``module``."""
    linears = {name for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    out, skipped = {}, set()
    for key in ckpt:
        new = rename(key)
        if new is None or not new.endswith(".weight") or new[: -len(".weight")] not in linears:
            continue
        qtype = ckpt.packed(key)[1]
        if supported(qtype):
            out[new] = key
        elif qtype_name(qtype) not in ("F32", "F16", "BF16"):
            skipped.add(qtype_name(qtype))
    if skipped:
        log.warning("%s: GGUF types %s have no runtime kernel; those weights are dequantised at load",
                    ckpt.path, sorted(skipped))
    return out


def swap_in_packed(ckpt: Checkpoint, packed: Mapping[str, str], dtype: torch.dtype) -> Callable[[nn.Module], None]:
    """A ``finish`` step for :func:`~firered_core.formats.build.build_with_weights`: replace each Linear named in
    ``packed`` (its weight still on the meta device, its bias loaded) by a :class:`GGUFLinear` over the file bytes."""

    def finish(module: nn.Module) -> None:
        for new, key in packed.items():
            name = new[: -len(".weight")]
            linear = module.get_submodule(name)
            shape = (linear.out_features, linear.in_features)
            if tuple(ckpt.shape(key)) != shape:
                raise FormatError(f"{ckpt.path}: {key} has shape {ckpt.shape(key)}, the model's {name} needs {shape}")
            data, qtype = ckpt.packed(key)
            bias = None if linear.bias is None else linear.bias.detach()
            if bias is not None and bias.is_meta:
                raise FormatError(f"{ckpt.path}: {name}.bias is missing")
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, GGUFLinear(data, qtype, *shape, bias=bias, dtype=dtype))

    return finish


def packed_summary(module: nn.Module) -> str:
    """``"412 GGUFLinear (Q4_0 x400, Q8_0 x12)"``: what stayed packed, for logs."""
    counts: dict[str, int] = {}
    for m in module.modules():
        if isinstance(m, GGUFLinear):
            counts[m.qtype_name] = counts.get(m.qtype_name, 0) + 1
    detail = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
    return f"{sum(counts.values())} GGUFLinear ({detail})" if counts else "no packed layers"
