"""The Qwen2.5-VL text encoder from one file, in the layouts people hold, plus where its processor comes from.

Layouts: transformers 5 (``model.language_model.*``, ``model.visual.*``, ``lm_head``) and the original Hugging Face /
ComfyUI one (``model.layers.*``, ``model.embed_tokens``, ``model.norm``, ``visual.*``, often without ``lm_head``, which
the edit pipeline never uses: it is then tied to the embeddings). The configuration is not guessed: the file's tensor
shapes must match exactly one known configuration (a config.json next to the file, Qwen2.5-VL-7B, or the test presets).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..processor import QWEN25_VL_SPECIAL_TOKENS, qwen25_vl_processor
from .build import build_with_weights, sidecar_config
from .dequant import is_aux_key, iter_dequantized
from .errors import FormatError
from .identify import common_prefix_for, identify
from .checkpoint import Checkpoint
from .readers import open_checkpoint

log = logging.getLogger(__name__)

CLASS_NAME = "Qwen2_5_VLForConditionalGeneration"
PROCESSOR_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")

QWEN25_VL_7B: dict = dict(
    text_config=dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6, sliding_window=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False,
    ),
    vision_config=dict(
        depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16, in_chans=3,
        out_hidden_size=3584, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2,
    ),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    tie_word_embeddings=False,
)


# The built-in demo models (firered_core.demo_models): the names a log line or an error shows for them.
DEMO = "FireRed demo model"


def _known_configs() -> list[tuple[str, Callable[[], object]]]:
    from transformers import Qwen2_5_VLConfig

    def preset(name: str):
        def make():
            from ..demo_models import build_tokenizer, text_encoder_config

            return text_encoder_config(name, build_tokenizer())
        return make

    return [("Qwen2.5-VL-7B", lambda: Qwen2_5_VLConfig(**QWEN25_VL_7B)),
            (f"{DEMO} tiny", preset("tiny")), (f"{DEMO} medium", preset("medium"))]


def text_encoder_renamer(keys) -> Callable[[str], str | None]:
    """A function mapping file keys to transformers-5 ``Qwen2_5_VLForConditionalGeneration`` keys."""
    keys = list(keys)
    new_prefix = common_prefix_for(keys, "model.language_model.embed_tokens.weight")
    old_prefix = common_prefix_for(keys, "model.embed_tokens.weight")
    if new_prefix is None and old_prefix is None:
        raise FormatError(f"not a Qwen2.5-VL text encoder: found {identify(keys)}")
    if new_prefix is not None:
        return lambda k: k[len(new_prefix):] if k.startswith(new_prefix) else None
    prefix = old_prefix

    def rename(key: str) -> str | None:
        if not key.startswith(prefix):
            return None
        key = key[len(prefix):]
        if key.startswith("model."):
            return "model.language_model." + key[len("model."):]
        if key.startswith("visual."):
            return "model." + key
        return key

    return rename


def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
    from accelerate import init_empty_weights
    from transformers import Qwen2_5_VLForConditionalGeneration

    with init_empty_weights():
        model = Qwen2_5_VLForConditionalGeneration(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def detect_text_encoder_config(file_shapes: Mapping[str, tuple[int, ...]], sidecar: Mapping | None = None,
                               source: str = "") -> tuple[str, object]:
    """``(name, Qwen2_5_VLConfig)`` of the one known configuration whose shapes equal the file's (lm_head optional)."""
    from transformers import Qwen2_5_VLConfig

    candidates = list(_known_configs())
    if sidecar:
        candidates.insert(0, ("config.json next to the file", lambda: Qwen2_5_VLConfig(**sidecar)))
    found = dict(file_shapes)
    found.pop("lm_head.weight", None)
    for name, make in candidates:
        config = make()
        if config.text_config.hidden_size != found.get("model.language_model.norm.weight", (0,))[0]:
            continue
        expected = _expected_shapes(config)
        expected.pop("lm_head.weight", None)
        if expected == found:
            log.info("%s: text encoder matches %s", source, name)
            return name, config
    hidden = found.get("model.language_model.norm.weight", ("?",))[0]
    layers = len({k.split(".")[3] for k in found if k.startswith("model.language_model.layers.")})
    vocab = found.get("model.language_model.embed_tokens.weight", ("?",))[0]
    depth = len({k.split(".")[3] for k in found if k.startswith("model.visual.blocks.")})
    raise FormatError(f"{source}: a Qwen2.5-VL-like text encoder (hidden {hidden}, {layers} layers, vocab {vocab}, "
                      f"vision depth {depth}) that matches no known configuration "
                      f"({', '.join(n for n, _ in candidates)}); put its config.json next to the file")


def load_text_encoder(ckpt: Checkpoint, dtype: torch.dtype) -> nn.Module:
    from transformers import Qwen2_5_VLForConditionalGeneration

    try:
        rename = text_encoder_renamer(ckpt.keys())
    except FormatError as exc:
        raise FormatError(f"{ckpt.path}: {exc}") from None
    header = {n: ckpt.shape(k) for k in ckpt if not is_aux_key(k) and (n := rename(k)) is not None}
    name, config = detect_text_encoder_config(header, sidecar_config(ckpt.path, (CLASS_NAME,)), str(ckpt.path))
    state = dict(iter_dequantized(ckpt, dtype, rename))
    tie = "lm_head.weight" not in state
    if tie:
        state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"]
        log.info("%s: no lm_head in the file; tied to the input embeddings (the edit pipeline uses hidden states "
                 "only)", ckpt.path)
    model = build_with_weights(lambda: Qwen2_5_VLForConditionalGeneration(config), state, ckpt.path,
                               f"{name} text encoder")
    return model


def processor_from_tokenizer_dir(folder: str | Path):
    """The Qwen2.5-VL processor from a folder of Qwen2.5 tokenizer files (``vocab.json``, ``merges.txt``,
    ``tokenizer_config.json`` or ``tokenizer.json``, e.g. ComfyUI's ``comfy/text_encoders/qwen25_tokenizer``).

    The special tokens are registered if the folder lacks them, and must get the real ids (a different tokenizer
    would silently feed the text encoder wrong ids); image-processor settings come from
    :data:`QWEN25_VL_IMAGE_PROCESSOR`. A folder that also holds a ``preprocessor_config.json`` is loaded as is.
    """
    from transformers import Qwen2Tokenizer, Qwen2VLProcessor

    folder = Path(folder)
    if not folder.is_dir() or not any((folder / f).is_file() for f in PROCESSOR_FILES):
        raise FormatError(f"{folder}: no tokenizer files ({', '.join(PROCESSOR_FILES)}) there")
    try:
        if (folder / "preprocessor_config.json").is_file():
            return Qwen2VLProcessor.from_pretrained(folder, local_files_only=True)
        tokenizer = Qwen2Tokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise FormatError(f"cannot load the tokenizer from {folder}: {exc}") from exc
    missing = [t for t in QWEN25_VL_SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    return qwen25_vl_processor(tokenizer)


def _fits_vocabulary(processor, vocab_size: int) -> bool:
    return max(processor.tokenizer.convert_tokens_to_ids(t) for t in QWEN25_VL_SPECIAL_TOKENS) < vocab_size


def load_text_encoder_processor(path: str | Path, tokenizer: str | Path | None = None,
                                default_tokenizer: str | Path | None = None):
    """The ``Qwen2VLProcessor`` for a single-file text encoder.

    In order: ``tokenizer`` (a folder the user named: a processor folder or bare Qwen2.5 tokenizer files); a
    ``processor/`` or ``tokenizer/`` folder (or tokenizer files) next to the file; the package's built-in processor
    for the tiny and medium test models; ``default_tokenizer`` (tokenizer files a host application ships, e.g.
    ComfyUI's Qwen2.5 tokenizer) when its ids fit the text encoder's vocabulary. Otherwise a :class:`FormatError`
    says where to put the files (they cannot be derived from weights).
    """
    path = Path(path)
    folder = path.parent
    if tokenizer is not None:
        return processor_from_tokenizer_dir(tokenizer)
    for candidate in (folder / "processor", folder / "tokenizer", folder):
        if candidate.is_dir() and any((candidate / f).is_file() for f in PROCESSOR_FILES):
            return processor_from_tokenizer_dir(candidate)
    with open_checkpoint(path) as ckpt:
        rename = text_encoder_renamer(ckpt.keys())
        header = {n: ckpt.shape(k) for k in ckpt if not is_aux_key(k) and (n := rename(k)) is not None}
        name, config = detect_text_encoder_config(header, sidecar_config(path, (CLASS_NAME,)), str(path))
    if name.startswith(DEMO):
        from ..demo_models import build_processor

        return build_processor()
    if default_tokenizer is not None:
        processor = processor_from_tokenizer_dir(default_tokenizer)
        if _fits_vocabulary(processor, config.text_config.vocab_size):
            log.info("%s: tokenizer from %s, image processor settings of Qwen2.5-VL", path, default_tokenizer)
            return processor
    raise FormatError(
        f"{path}: a {name} text encoder file carries no tokenizer. Put the Qwen2.5-VL processor files "
        f"(tokenizer.json, tokenizer_config.json, vocab.json, merges.txt, preprocessor_config.json, chat_template.json) "
        f"in {folder / 'processor'} — they are the processor/ and tokenizer/ folders of the FireRed-Image-Edit or "
        "Qwen-Image-Edit Hugging Face repository — or give a tokenizer folder (firered-edit --tokenizer DIR)")
