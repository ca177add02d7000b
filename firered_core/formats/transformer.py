"""The Qwen-Image / FireRed MMDiT transformer from one file: key prefixes, architecture detection, build.

Files in the wild use the diffusers key names, optionally behind ComfyUI's ``model.diffusion_model.`` (or
``diffusion_model.`` / ``transformer.``) prefix; ComfyUI marks the "reference at t=0" variant with an empty
``__index_timestep_zero__`` tensor.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch
from torch import nn

from .build import build_with_weights, metadata_config, sidecar_config
from .dequant import is_aux_key, iter_dequantized
from .errors import FormatError
from .identify import common_prefix_for, identify
from .checkpoint import Checkpoint, shapes

log = logging.getLogger(__name__)

CLASS_NAME = "QwenImageTransformer2DModel"
REQUIRED = ("img_in.weight", "txt_in.weight", "txt_norm.weight", "proj_out.weight",
            "transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn.norm_q.weight")
ZERO_COND_MARKER = "__index_timestep_zero__"
# Rotary axes are not stored in the weights. 128 is the published Qwen-Image / FireRed head size; 16 is the tiny
# test model of firered_core.demo_models. Anything else needs a config.json next to the file.
ROPE_AXES_BY_HEAD_DIM: dict[int, tuple[int, int, int]] = {128: (16, 56, 56), 16: (4, 6, 6)}
_CONFIG_KEYS = ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
                "num_attention_heads", "joint_attention_dim", "guidance_embeds", "axes_dims_rope", "zero_cond_t",
                "use_additional_t_cond", "use_layer3d_rope")


def find_prefix(keys) -> str:
    keys = list(keys)
    prefix = common_prefix_for(keys, "img_in.weight")
    if prefix is None or prefix + "txt_in.weight" not in set(keys):
        raise FormatError(f"not a Qwen-Image / FireRed transformer: found {identify(keys)}")
    return prefix


def detect_transformer_config(source: Mapping, metadata: Mapping[str, str] | None = None,
                              sidecar: Mapping | None = None) -> dict:
    """Read the transformer's constructor arguments from tensor shapes (a state dict, a header or a checkpoint).

    Layer count, widths, heads, in/out channels and the optional embeddings come from the tensors. What the tensors
    cannot say comes from, in order: ``sidecar`` (a config.json next to the file), a ``config`` JSON in the file
    metadata, the ComfyUI ``__index_timestep_zero__`` marker (``zero_cond_t``), and for the rotary axes the
    published value for the head size. Each choice is logged with where it came from.
    """
    all_shapes = shapes(source)
    prefix = find_prefix(all_shapes)
    marker = any(k.rsplit(".", 1)[-1] == ZERO_COND_MARKER for k in all_shapes)
    s = {k[len(prefix):]: v for k, v in all_shapes.items() if k.startswith(prefix)}
    missing = [k for k in REQUIRED if k not in s]
    if missing:
        raise FormatError(f"transformer keys missing: {', '.join(missing)} (found {identify(all_shapes)})")
    blocks = sorted({int(m.group(1)) for k in s if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    if blocks != list(range(len(blocks))):
        gaps = sorted(set(range(blocks[-1] + 1)) - set(blocks))
        raise FormatError(f"transformer blocks are not contiguous: block(s) {gaps} missing of {blocks[-1] + 1}")
    inner, in_channels = s["img_in.weight"]
    head_dim = s["transformer_blocks.0.attn.norm_q.weight"][0]
    if inner % head_dim:
        raise FormatError(f"inner width {inner} is not a multiple of the head size {head_dim}")
    given = {**(metadata_config(metadata or {}) or {}), **(dict(sidecar) if sidecar else {})}
    patch = int(given.get("patch_size", 2))
    out_total = s["proj_out.weight"][0]
    if out_total % (patch * patch):
        raise FormatError(f"proj_out has {out_total} outputs, not a multiple of patch_size² = {patch * patch}")
    cfg = dict(
        patch_size=patch, in_channels=in_channels, out_channels=out_total // (patch * patch), num_layers=len(blocks),
        attention_head_dim=head_dim, num_attention_heads=inner // head_dim, joint_attention_dim=s["txt_in.weight"][1],
        guidance_embeds=any(k.startswith("time_text_embed.guidance_embedder.") for k in s),
        use_additional_t_cond="time_text_embed.addition_t_embedding.weight" in s,
    )
    sources = {"zero_cond_t": "default False (no config, no ComfyUI marker)", "axes_dims_rope": "published value"}
    if "zero_cond_t" in given:
        cfg["zero_cond_t"], sources["zero_cond_t"] = bool(given["zero_cond_t"]), "config"
    elif marker:
        cfg["zero_cond_t"], sources["zero_cond_t"] = True, f"ComfyUI {ZERO_COND_MARKER} marker"
    else:
        cfg["zero_cond_t"] = False
    if "axes_dims_rope" in given:
        cfg["axes_dims_rope"], sources["axes_dims_rope"] = tuple(given["axes_dims_rope"]), "config"
    elif head_dim in ROPE_AXES_BY_HEAD_DIM:
        cfg["axes_dims_rope"] = ROPE_AXES_BY_HEAD_DIM[head_dim]
    else:
        raise FormatError(f"head size {head_dim} has no published rotary axes; put the transformer's config.json "
                          "next to the file")
    if sum(cfg["axes_dims_rope"]) != head_dim:
        raise FormatError(f"rotary axes {cfg['axes_dims_rope']} do not sum to the head size {head_dim}")
    if given.get("use_layer3d_rope"):
        cfg["use_layer3d_rope"] = True
    log.info("transformer config from tensors: %s (zero_cond_t: %s; rope axes: %s)",
             {k: cfg[k] for k in _CONFIG_KEYS if k in cfg}, sources["zero_cond_t"], sources["axes_dims_rope"])
    return cfg


def load_transformer(ckpt: Checkpoint, dtype: torch.dtype, config: Mapping | None = None,
                     gguf_mode: str = "runtime", fp8_mode: str = "load") -> nn.Module:
    """Build ``QwenImageTransformer2DModel`` from an open checkpoint, converting weights to ``dtype``.

    For a GGUF file, ``gguf_mode="runtime"`` keeps quantised Linear weights packed (:class:`GGUFLinear`, decoded at
    each call); ``"load"`` dequantises every tensor now. For an fp8 file, ``fp8_mode="runtime"`` keeps the e4m3
    Linear weights in fp8 (``quant.FastQuantLinear``: fp8 matmuls on GPUs that have them, no full-precision copy).
    """
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    from .gguf.runtime import check_gguf_mode, packed_summary, packed_weight_keys, swap_in_packed

    check_gguf_mode(gguf_mode)

    try:
        prefix = find_prefix(ckpt.keys())
    except FormatError as exc:
        raise FormatError(f"{ckpt.path}: {exc}") from None
    sidecar = sidecar_config(ckpt.path, (CLASS_NAME,))
    cfg = dict(config) if config else detect_transformer_config(ckpt, ckpt.metadata, sidecar)
    foreign = [k for k in ckpt if not k.startswith(prefix) and not is_aux_key(k)]
    if foreign:
        log.info("%s: ignoring %d tensors outside %r (e.g. %s)", ckpt.path, len(foreign), prefix, foreign[0])

    def rename(key: str) -> str | None:
        return key[len(prefix):] if key.startswith(prefix) else None

    with init_empty_weights(include_buffers=False):
        skeleton = QwenImageTransformer2DModel(**cfg)
    packed = packed_weight_keys(ckpt, skeleton, rename) if ckpt.kind == "gguf" and gguf_mode == "runtime" else {}
    fp8_keys, finish_fp8 = {}, None
    if fp8_mode == "runtime" and ckpt.kind != "gguf":
        from ..quant.fp8_file import fp8_weight_keys, swap_in_fp8
        from .dequant import weight_scale_key

        fp8_keys = fp8_weight_keys(ckpt, skeleton, rename)
        finish_fp8 = swap_in_fp8(ckpt, fp8_keys, dtype, weight_scale_key)
    elif fp8_mode != "load":
        from ..quant.fp8_file import check_fp8_mode

        check_fp8_mode(fp8_mode)
    packed_files = set(packed.values()) | set(fp8_keys.values())

    def rename_dense(key: str) -> str | None:
        return None if key in packed_files else rename(key)

    state = dict(iter_dequantized(ckpt, dtype, rename_dense))
    module = build_with_weights(lambda: skeleton, state, ckpt.path,
                                f"transformer ({cfg['num_layers']} layers, {cfg['num_attention_heads']}x"
                                f"{cfg['attention_head_dim']})", allow_missing=tuple(packed) + tuple(fp8_keys),
                                finish=swap_in_packed(ckpt, packed, dtype) if packed else finish_fp8)
    if ckpt.kind == "gguf":
        log.info("%s: gguf_mode=%s, %s", ckpt.path, gguf_mode, packed_summary(module))
    elif fp8_mode == "runtime":
        log.info("%s: fp8_mode=runtime, %d Linear weights kept in fp8%s", ckpt.path, len(fp8_keys),
                 "" if fp8_keys else " (the file has no e4m3 Linear weights: loaded in full precision)")
    return module
