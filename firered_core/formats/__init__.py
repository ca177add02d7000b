"""Single-file checkpoints as people hold them: safetensors (diffusers or ComfyUI names, fp32/bf16/fp16, fp8,
ComfyUI scaled fp8), GGUF quantisations, and weights-only legacy torch files. Nothing is unpickled.

Entry point: :func:`load_single_file`. Every failure is a :class:`FormatError` naming the file and what it holds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import FormatError
from .checkpoint import Checkpoint
from .gguf import GGUF_MODES, GGUFLinear, check_gguf_mode
from .readers import open_checkpoint
from .text_encoder import detect_text_encoder_config, load_text_encoder_processor
from .transformer import detect_transformer_config
from .vae import convert_comfy_vae_state, convert_diffusers_vae_state, detect_vae_config

KINDS = ("transformer", "vae", "text_encoder")

__all__ = ["GGUF_MODES", "KINDS", "Checkpoint", "FormatError", "GGUFLinear", "check_gguf_mode",
           "convert_comfy_vae_state", "convert_diffusers_vae_state",
           "detect_text_encoder_config", "detect_transformer_config", "detect_vae_config",
           "load_single_file", "load_text_encoder_processor", "open_checkpoint"]


def load_single_file(kind: str, path: str | Path, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu", gguf_mode: str = "runtime",
                     fp8_mode: str = "load") -> nn.Module:
    """Load one component (``transformer``, ``vae`` or ``text_encoder``) from a single weights file.

    The format is read from the file's first bytes; the architecture from its tensors. fp8 and scaled fp8 weights
    are dequantised to ``dtype`` while loading, one tensor at a time. A GGUF transformer keeps its quantised Linear
    weights packed (:class:`GGUFLinear`, decoded at each call) with ``gguf_mode="runtime"`` (default), or is
    dequantised at load with ``"load"``; GGUF VAEs and text encoders are always dequantised at load. An fp8
    transformer keeps its e4m3 Linear weights in fp8 with ``fp8_mode="runtime"`` (fp8 matmuls where the GPU has
    them). Returns the module in eval mode on ``device``.
    """
    from .text_encoder import load_text_encoder
    from .transformer import load_transformer
    from .vae import load_vae

    loaders = {"transformer": load_transformer, "vae": load_vae, "text_encoder": load_text_encoder}
    if kind not in loaders:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    check_gguf_mode(gguf_mode)
    with open_checkpoint(path) as ckpt:
        if len(ckpt) == 0:
            raise FormatError(f"{path}: the file holds no tensors")
        if kind == "transformer":
            module = load_transformer(ckpt, dtype, gguf_mode=gguf_mode, fp8_mode=fp8_mode)
        else:
            module = loaders[kind](ckpt, dtype)
    return module.to(device).eval().requires_grad_(False)
