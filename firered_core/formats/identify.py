"""Name the architecture a state dict belongs to, so a wrong file gets an error that says what it is."""

from __future__ import annotations

from collections.abc import Iterable

_SIGNATURES: list[tuple[str, tuple[str, ...]]] = [
    ("Qwen-Image MMDiT transformer (FireRed / Qwen-Image-Edit)", ("img_in.weight", "txt_in.weight", "txt_norm.weight")),
    ("Flux transformer", ("double_blocks.0.img_attn.qkv.weight",)),
    ("Flux transformer (diffusers)", ("single_transformer_blocks.0.attn.to_q.weight",)),
    ("SD3 MMDiT", ("joint_blocks.0.x_block.attn.qkv.weight",)),
    ("Wan video transformer", ("blocks.0.self_attn.q.weight",)),
    ("Stable Diffusion UNet", ("input_blocks.0.0.weight",)),
    ("diffusers UNet", ("down_blocks.0.resnets.0.conv1.weight", "time_embedding.linear_1.weight")),
    ("Wan / Qwen-Image VAE (ComfyUI names)", ("decoder.middle.0.residual.0.gamma",)),
    ("Wan / Qwen-Image VAE (diffusers names)", ("decoder.mid_block.resnets.0.norm1.gamma",)),
    ("SD / Flux VAE", ("decoder.mid.block_1.conv1.weight",)),
    ("Qwen2.5-VL text encoder", ("visual.blocks.0.attn.qkv.weight",)),
    ("Qwen2.5-VL text encoder", ("model.visual.blocks.0.attn.qkv.weight",)),
    ("language model (no vision tower)", ("model.layers.0.self_attn.q_proj.weight",)),
    ("CLIP / T5 text encoder", ("text_model.encoder.layers.0.self_attn.q_proj.weight",)),
    ("T5 text encoder", ("encoder.block.0.layer.0.SelfAttention.q.weight",)),
    ("LoRA", (".lora_A.weight",)),
    ("LoRA", (".lora_down.weight",)),
]


def identify(keys: Iterable[str]) -> str:
    """A short description of what the keys look like: an architecture name, or a sample of the keys."""
    keys = list(keys)
    for name, needles in _SIGNATURES:
        if all(any(k.endswith(n) for k in keys) for n in needles):
            return name
    sample = ", ".join(keys[:4])
    return f"an unrecognised layout ({len(keys)} tensors, e.g. {sample})" if keys else "no tensors at all"


def common_prefix_for(keys: Iterable[str], anchor: str) -> str | None:
    """The prefix in front of ``anchor`` in the first key that ends with it (``model.diffusion_model.`` ...)."""
    for key in keys:
        if key == anchor or key.endswith("." + anchor):
            return key[: len(key) - len(anchor)]
    return None
