"""The Qwen2.5-VL processor from a tokenizer and the published image-processor numbers (what a single-file text
encoder needs besides its weights; the demo models use it too)."""

from __future__ import annotations

# The published Qwen2.5-VL image processor (preprocessor_config.json of Qwen/Qwen2.5-VL-7B-Instruct): numbers, so a
# single-file text encoder needs only tokenizer files.
QWEN25_VL_IMAGE_PROCESSOR: dict = dict(
    patch_size=14, temporal_patch_size=2, merge_size=2, min_pixels=3136, max_pixels=12845056,
    image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
)
# The special tokens the prompt template and the vision tower use, with their ids in the real vocabulary.
QWEN25_VL_SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
    "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656,
}


def qwen25_vl_processor(tokenizer):
    """A ``Qwen2VLProcessor`` from a Qwen2 tokenizer and the published Qwen2.5-VL image-processor numbers."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    sizes = {k: v for k, v in QWEN25_VL_IMAGE_PROCESSOR.items() if k not in ("image_mean", "image_std")}
    norm = dict(image_mean=QWEN25_VL_IMAGE_PROCESSOR["image_mean"], image_std=QWEN25_VL_IMAGE_PROCESSOR["image_std"])
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes, **norm), tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor(**sizes, **norm))
