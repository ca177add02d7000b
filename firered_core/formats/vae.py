"""The Qwen-Image (Wan 2.1) VAE from one file, in diffusers names or in ComfyUI's Wan-VAE names.

ComfyUI keeps the original Wan module tree: flat ``encoder.downsamples.N`` / ``decoder.upsamples.N`` lists of
residual blocks (``residual.{0,2,3,6}``, ``shortcut``) and resamplers, ``middle.{0,1,2}``, ``head.{0,2}``, and top-level
``conv1`` / ``conv2``. diffusers keeps the encoder list flat (``down_blocks.N``) but groups the decoder into
``up_blocks.i.resnets.j`` + ``up_blocks.i.upsamplers.0`` and renames the rest. The mapping below is written from the
two module trees; the decoder grouping is read from where the first upsampler sits.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .build import build_with_weights, metadata_config, sidecar_config
from .dequant import is_aux_key, iter_dequantized
from .errors import FormatError
from .identify import identify
from .checkpoint import Checkpoint, shapes

log = logging.getLogger(__name__)

CLASS_NAME = "AutoencoderKLQwenImage"
_PREFIXES = ("first_stage_model.", "vae.", "model.")
_RESNET = [("residual.0.gamma", "norm1.gamma"), ("residual.2.", "conv1."), ("residual.3.gamma", "norm2.gamma"),
           ("residual.6.", "conv2."), ("shortcut.", "conv_shortcut.")]
_SIMPLE = [("encoder.conv1.", "encoder.conv_in."), ("decoder.conv1.", "decoder.conv_in."),
           ("encoder.head.0.", "encoder.norm_out."), ("encoder.head.2.", "encoder.conv_out."),
           ("decoder.head.0.", "decoder.norm_out."), ("decoder.head.2.", "decoder.conv_out."),
           ("encoder.middle.0.", "encoder.mid_block.resnets.0."), ("encoder.middle.1.", "encoder.mid_block.attentions.0."),
           ("encoder.middle.2.", "encoder.mid_block.resnets.1."), ("decoder.middle.0.", "decoder.mid_block.resnets.0."),
           ("decoder.middle.1.", "decoder.mid_block.attentions.0."), ("decoder.middle.2.", "decoder.mid_block.resnets.1."),
           ("conv1.", "quant_conv."), ("conv2.", "post_quant_conv."), ("encoder.downsamples.", "encoder.down_blocks.")]


def is_comfy_layout(keys: Iterable[str]) -> bool:
    return any(".middle.0.residual." in k or k.startswith(("decoder.upsamples.", "encoder.downsamples.")) for k in keys)


def _swap_resnet(rest: str, forward: bool) -> str:
    for comfy, diff in _RESNET:
        a, b = (comfy, diff) if forward else (diff, comfy)
        if rest.startswith(a):
            return b + rest[len(a):]
    return rest


def _decoder_stride(keys: Iterable[str]) -> int:
    """Resnets + 1 per decoder stage in the flat ComfyUI list: the index of the first upsampler, plus one."""
    ups = sorted({int(m.group(1)) for k in keys if (m := re.match(r"decoder\.upsamples\.(\d+)\.resample\.", k))})
    if not ups:
        raise FormatError("ComfyUI VAE without decoder upsamplers")
    if any(re.match(r"decoder\.upsamples\.\d+\.to_qkv\.", k) for k in keys):
        raise FormatError("ComfyUI VAE with attention in the decoder stages: not the Qwen-Image VAE")
    return ups[0] + 1


def comfy_to_diffusers_vae_key(key: str, stride: int) -> str:
    """One ComfyUI Wan-VAE key in diffusers ``AutoencoderKLQwenImage`` names (``stride`` = resnets per stage + 1)."""
    m = re.match(r"decoder\.upsamples\.(\d+)\.(.*)", key)
    if m:
        k, rest = int(m.group(1)), m.group(2)
        stage, j = divmod(k, stride)
        if j < stride - 1:
            return f"decoder.up_blocks.{stage}.resnets.{j}." + _swap_resnet(rest, True)
        return f"decoder.up_blocks.{stage}.upsamplers.0.{rest}"
    for comfy, diff in _SIMPLE:
        if key.startswith(comfy):
            key = diff + key[len(comfy):]
            break
    m = re.match(r"(encoder\.down_blocks\.\d+\.|(?:en|de)coder\.mid_block\.resnets\.\d+\.)(.*)", key)
    if m:
        return m.group(1) + _swap_resnet(m.group(2), True)
    return key


def diffusers_to_comfy_vae_key(key: str, num_res_blocks: int) -> str:
    """The inverse of :func:`comfy_to_diffusers_vae_key` (for writing ComfyUI-layout files)."""
    stride = num_res_blocks + 2
    m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)", key)
    if m:
        stage, rest = int(m.group(1)), m.group(4)
        if m.group(3) is not None:
            return f"decoder.upsamples.{stage * stride + int(m.group(3))}." + _swap_resnet(rest, False)
        return f"decoder.upsamples.{stage * stride + stride - 1}.{rest}"
    m = re.match(r"(encoder\.down_blocks\.\d+\.|(?:en|de)coder\.mid_block\.resnets\.\d+\.)(.*)", key)
    if m:
        key = m.group(1) + _swap_resnet(m.group(2), False)
    for comfy, diff in _SIMPLE:
        if key.startswith(diff):
            return comfy + key[len(diff):]
    return key


def convert_comfy_vae_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole ComfyUI Wan-VAE state dict in diffusers names."""
    stride = _decoder_stride(state)
    return {comfy_to_diffusers_vae_key(k, stride): v for k, v in state.items()}


def convert_diffusers_vae_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole diffusers ``AutoencoderKLQwenImage`` state dict in ComfyUI Wan-VAE names."""
    nrb = len({k.split(".")[4] for k in state if k.startswith("decoder.up_blocks.0.resnets.")}) - 1
    return {diffusers_to_comfy_vae_key(k, nrb): v for k, v in state.items()}


def detect_vae_config(source: Mapping, metadata: Mapping[str, str] | None = None,
                      sidecar: Mapping | None = None) -> dict:
    """``AutoencoderKLQwenImage`` arguments from tensor shapes (diffusers names); latent statistics from a config
    when one is given, else the published Qwen-Image values (the class defaults)."""
    s = shapes(source)
    need = ("encoder.conv_in.weight", "post_quant_conv.weight", "decoder.conv_out.weight")
    if any(k not in s for k in need):
        raise FormatError(f"not a Qwen-Image / Wan VAE: found {identify(s)}")
    down = sorted({int(m.group(1)) for k in s if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
    stages, current, temporal = [], [], []
    for i in down:
        if f"encoder.down_blocks.{i}.resample.1.weight" in s:
            stages.append(current)
            current = []
            temporal.append(f"encoder.down_blocks.{i}.time_conv.weight" in s)
        elif f"encoder.down_blocks.{i}.conv1.weight" in s:
            current.append(s[f"encoder.down_blocks.{i}.conv1.weight"][0])
        else:
            raise FormatError(f"VAE encoder block {i} is neither a residual block nor a resampler (attention in "
                              "the encoder stages is not the Qwen-Image VAE)")
    stages.append(current)
    base = s["encoder.conv_in.weight"][0]
    if any(len(st) != len(stages[0]) or not st for st in stages):
        raise FormatError(f"VAE encoder stages have different block counts: {[len(st) for st in stages]}")
    cfg = dict(base_dim=base, z_dim=s["post_quant_conv.weight"][0], dim_mult=[st[0] // base for st in stages],
               num_res_blocks=len(stages[0]), attn_scales=[], temperal_downsample=temporal,
               input_channels=s["encoder.conv_in.weight"][1])
    given = {**(metadata_config(metadata or {}) or {}), **(dict(sidecar) if sidecar else {})}
    for key in ("latents_mean", "latents_std"):
        if key in given:
            cfg[key] = list(given[key])
    if len(cfg.get("latents_mean", [0] * 16)) != cfg["z_dim"]:
        raise FormatError(f"latents_mean has {len(cfg['latents_mean'])} values for z_dim {cfg['z_dim']}")
    log.info("vae config from tensors: %s", cfg)
    return cfg


def load_vae(ckpt: Checkpoint, dtype: torch.dtype) -> nn.Module:
    from diffusers import AutoencoderKLQwenImage

    keys = [k for k in ckpt if not is_aux_key(k)]
    prefix = next((p for p in _PREFIXES if keys and all(k.startswith(p) for k in keys)), "")
    stripped = [k[len(prefix):] for k in keys]
    comfy = is_comfy_layout(stripped)
    try:
        stride = _decoder_stride(stripped) if comfy else 0
    except FormatError as exc:
        raise FormatError(f"{ckpt.path}: {exc}") from None

    def rename(key: str) -> str:
        key = key[len(prefix):]
        return comfy_to_diffusers_vae_key(key, stride) if comfy else key

    header = {rename(k): ckpt.shape(k) for k in keys}
    try:
        cfg = detect_vae_config(header, ckpt.metadata, sidecar_config(ckpt.path, (CLASS_NAME,)))
    except FormatError as exc:
        raise FormatError(f"{ckpt.path}: {exc}") from None
    state = dict(iter_dequantized(ckpt, dtype, rename))
    log.info("%s: VAE in %s names", ckpt.path, "ComfyUI Wan-VAE" if comfy else "diffusers")
    return build_with_weights(lambda: AutoencoderKLQwenImage(**cfg), state, ckpt.path, "Qwen-Image VAE")
