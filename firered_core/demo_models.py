"""Tiny and medium random models of the real FireRed / Qwen-Image-Edit-Plus architecture, built offline.

The folders written here use the real Hugging Face layout and real module / key names (``transformer/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``processor/``, ``scheduler/``, ``model_index.json``), so every loader, format
converter and node sees what it would see with the 60 GB checkpoint, only smaller. Weights are random but
deterministic (seeded), and the byte-level tokenizer carries the Qwen2.5-VL special tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .sampling import SCHEDULER_CONFIG

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]


@dataclass(frozen=True)
class Preset:
    """Sizes of a random model. ``tiny`` is for tests, ``medium`` (~170M transformer) for benchmarks."""

    layers: int
    heads: int
    head_dim: int
    axes_dims_rope: tuple[int, int, int]
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    mrope_section: tuple[int, int, int]
    vision_hidden: int
    vision_depth: int
    vae_base_dim: int
    vae_res_blocks: int
    zero_cond_t: bool = False
    extra: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        layers=2, heads=4, head_dim=16, axes_dims_rope=(4, 6, 6),
        text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2, mrope_section=(2, 3, 3),
        vision_hidden=32, vision_depth=2, vae_base_dim=8, vae_res_blocks=1,
    ),
    "medium": Preset(
        layers=8, heads=6, head_dim=128, axes_dims_rope=(16, 56, 56),
        text_hidden=256, text_layers=2, text_heads=4, text_kv_heads=2, mrope_section=(8, 12, 12),
        vision_hidden=64, vision_depth=2, vae_base_dim=16, vae_res_blocks=1,
    ),
}


def _byte_level_vocab() -> dict[str, int]:
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return {ch: i for i, ch in enumerate(alphabet)}


def build_tokenizer():
    """A Qwen2 byte-level BPE tokenizer (no merges) with the Qwen2.5-VL special tokens."""
    from transformers import Qwen2Tokenizer

    vocab = _byte_level_vocab()
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], errors="replace")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.model_max_length = 32768
    return tokenizer


def build_processor(tokenizer=None):
    """The Qwen2-VL processor with the image processor settings of the real checkpoint."""
    from .processor import qwen25_vl_processor

    return qwen25_vl_processor(tokenizer or build_tokenizer())


def transformer_config(preset: str = "tiny") -> dict:
    p = PRESETS[preset]
    return dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=p.layers, attention_head_dim=p.head_dim,
        num_attention_heads=p.heads, joint_attention_dim=p.text_hidden, guidance_embeds=False,
        axes_dims_rope=p.axes_dims_rope, zero_cond_t=p.zero_cond_t,
    )


def vae_config(preset: str = "tiny") -> dict:
    p = PRESETS[preset]
    return dict(base_dim=p.vae_base_dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=p.vae_res_blocks,
                attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0)


def text_encoder_config(preset: str, tokenizer):
    from transformers import Qwen2_5_VLConfig

    p = PRESETS[preset]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = ((len(tokenizer) + 63) // 64) * 64
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=p.text_hidden, intermediate_size=p.text_hidden * 2,
            num_hidden_layers=p.text_layers, num_attention_heads=p.text_heads, num_key_value_heads=p.text_kv_heads,
            max_position_embeddings=32768, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": list(p.mrope_section)},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=p.vision_depth, hidden_size=p.vision_hidden, intermediate_size=p.vision_hidden * 2,
            num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
            out_hidden_size=p.text_hidden, fullatt_block_indexes=[p.vision_depth - 1],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def build_components(preset: str = "tiny", seed: int = 0) -> dict:
    """Random-initialised components of the real classes, deterministic for a given seed."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(**transformer_config(preset))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(**vae_config(preset))
    torch.manual_seed(seed + 2)
    text_encoder = Qwen2_5_VLForConditionalGeneration(text_encoder_config(preset, tokenizer))
    _perturb_zero_inits(transformer, seed + 3)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        {k: v for k, v in SCHEDULER_CONFIG.items() if not k.startswith("_")})
    return dict(transformer=transformer.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                tokenizer=tokenizer, processor=processor, scheduler=scheduler)


def _perturb_zero_inits(module: torch.nn.Module, seed: int) -> None:
    """Give zero-initialised weights (modulation, output projection) small random values.

    A random model whose output projection is zero predicts zero velocity: every parity test would pass trivially.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if param.abs().max() == 0:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)


def save_model(components: dict, path: str | Path) -> Path:
    """Write components in the Hugging Face layout (``model_index.json`` + one folder per component)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler"):
        components[name].save_pretrained(path / name)
    index = {
        "_class_name": "QwenImageEditPlusPipeline",
        "_diffusers_version": "0.42.1",
        "processor": ["transformers", "Qwen2VLProcessor"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def build_model(path: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Build a random model of ``preset`` and save it at ``path`` (reused when a complete one is already there)."""
    path = Path(path)
    marker = path / ".firered-testing.json"
    stamp = {"preset": preset, "seed": seed, "version": 1}
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return path
    save_model(build_components(preset, seed), path)
    marker.write_text(json.dumps(stamp))
    return path


def default_demo_dir() -> Path:
    """Where the built-in demo model is cached (``$FIRERED_CACHE`` or ``~/.cache/firered``)."""
    import os

    root = os.environ.get("FIRERED_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "firered")
    return Path(root) / "demo-tiny"
