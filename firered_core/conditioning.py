"""Instruction conditioning: the prompt template, Qwen2.5-VL encoding, the template drop and padding masks.

Two prompt modes:
- ``pipeline``: diffusers' ``QwenImageEditPlusPipeline`` (FireRed's official inference): each image announced as
  ``Picture {k}: <|vision_start|><|image_pad|><|vision_end|>`` before the instruction.
- ``chat``: the form FireRed's training extractor builds with the chat template (images listed without labels).
With no image both use the text-to-image system prompt and drop its 34-token prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from PIL import Image

from .errors import InputError

EDIT_SYSTEM = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), then explain "
    "how the user's text instruction should alter or modify the image. Generate a new image that meets the user's "
    "requirements while maintaining consistency with the original input where appropriate."
)
T2I_SYSTEM = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of the "
    "objects and background:"
)
EDIT_DROP = 64
T2I_DROP = 34
IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPT_MODES = ("pipeline", "chat")
ROPE_POSITIONS = 4096  # diffusers' QwenEmbedRope table; text positions start after the largest image's half-side


# Qwen's control tokens (<|im_start|>, <|image_pad|>, <|vision_start|>, ... <|endoftext|>): the tokenizer reads
# them as structure wherever they appear, so typed into a prompt they open image slots without images (the
# processor's "image-pad count" ValueError) or end the user's turn early.
CONTROL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]{1,40}\|>")


def check_prompt_text(text: str, what: str = "prompt", field: str = "prompt") -> str:
    """Return ``text`` if it is plain text; refuse (one line naming the token) a Qwen control token in it.

    A prompt is user text. Escaping the token would still hand the model text it never saw in training, and the
    user almost certainly pasted a template by mistake, so it is refused: every prompt goes through here (CLI,
    nodes, recaptions, training rows, embedding extraction)."""
    if not isinstance(text, str):
        raise InputError(f"{what} is a {type(text).__name__}, not text", field=field)
    found = CONTROL_TOKEN.search(text)
    if found:
        raise InputError(f"{what} holds {found.group()!r}, a control token of the Qwen2.5-VL tokenizer: a prompt is "
                         f"plain text (remove the token; pictures are passed as images, not as tokens)", field=field)
    return text


def text_token_limit(img_shapes: list | tuple = ()) -> int:
    """How many instruction tokens (template drop done, image tokens included) the transformer can place after
    images of ``img_shapes`` (``(frames, rows, cols)`` of tokens): its rotary table has 4096 positions and the text
    starts after the largest image's half-side."""
    start = max([max(rows // 2, cols // 2) for _, rows, cols in img_shapes] or [1])
    return ROPE_POSITIONS - start


def check_text_length(tokens: int, img_shapes: list | tuple = ()) -> None:
    """Refuse an instruction longer than :func:`text_token_limit` up front, saying how long it is."""
    limit = text_token_limit(img_shapes)
    if tokens > limit:
        from .limits import OptionError

        raise OptionError(f"the instruction is {tokens} tokens long (the VL image tokens of the references "
                          f"included) but at most {limit} fit the transformer's text positions"
                          f"{' at this output size' if img_shapes else ''}: shorten the prompt", field="prompt")


@dataclass
class PromptEmbeds:
    """Embeddings [B, L, D] and mask [B, L] (None when every position is valid, as the reference passes it)."""

    embeds: torch.Tensor
    mask: torch.Tensor | None

    @classmethod
    def from_pieces(cls, pieces: list[torch.Tensor]) -> "PromptEmbeds":
        """Per-prompt [L_i, D] -> [B, L, D] right-padded with zeros to the longest; the mask is None when nothing is
        padded (the one padding routine: conditioning, the embedding cache and CFG stacking all use it)."""
        length = max(p.shape[0] for p in pieces)
        embeds = torch.stack([torch.cat([p, p.new_zeros(length - p.shape[0], *p.shape[1:])]) for p in pieces])
        mask = torch.stack([torch.arange(length, device=embeds.device) < p.shape[0] for p in pieces]).long()
        return cls(embeds, None if bool(mask.all()) else mask)

    def pieces(self) -> list[torch.Tensor]:
        """Each prompt's valid rows [L_i, D] (the padding stripped): the inverse of :meth:`from_pieces`."""
        if self.mask is None:
            return list(self.embeds)
        return [e[: int(m.sum())] for e, m in zip(self.embeds, self.mask)]

    def repeat(self, n: int) -> "PromptEmbeds":
        """Each prompt ``n`` times in a row (``num_images_per_prompt``)."""
        if n == 1:
            return self
        mask = None if self.mask is None else self.mask.repeat_interleave(n, dim=0)
        return PromptEmbeds(self.embeds.repeat_interleave(n, dim=0), mask)

    def to(self, device=None, dtype=None) -> "PromptEmbeds":
        mask = None if self.mask is None else self.mask.to(device)
        return PromptEmbeds(self.embeds.to(device=device, dtype=dtype), mask)


def build_text(prompt: str, num_images: int, mode: str = "pipeline") -> tuple[str, int]:
    """The full text the VL model reads for ``prompt`` with ``num_images`` images, and how many tokens to drop."""
    if mode not in PROMPT_MODES:
        raise InputError(f"prompt mode {mode!r} is not one of {PROMPT_MODES}", field="prompt_mode")
    check_prompt_text(prompt)
    if num_images == 0:
        system, drop, images = T2I_SYSTEM, T2I_DROP, ""
    elif mode == "pipeline":
        system, drop = EDIT_SYSTEM, EDIT_DROP
        images = "".join(f"Picture {k + 1}: {IMAGE_SLOT}" for k in range(num_images))
    else:
        system, drop = EDIT_SYSTEM, EDIT_DROP
        images = IMAGE_SLOT * num_images
    text = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{images}{prompt}<|im_end|>\n"
            "<|im_start|>assistant\n")
    return text, drop


def tokenize(processor, prompts: list[str], images: list[Image.Image] | None, mode: str = "pipeline"):
    """Run the processor as the reference does (every prompt sees every image); returns (model inputs, drop)."""
    n = len(images) if images else 0
    texts, drops = zip(*(build_text(p, n, mode) for p in prompts))
    batch_images = list(images) * len(prompts) if images else None
    inputs = processor(text=list(texts), images=batch_images, padding=True, return_tensors="pt")
    return inputs, drops[0]


@torch.no_grad()
def encode_prompt_pieces(text_encoder, processor, prompts: list[str] | str, images: list[Image.Image] | None = None,
                         mode: str = "pipeline", device=None, dtype=None) -> list[torch.Tensor]:
    """Encode instructions with the VL model: per prompt, the last hidden state of its valid tokens after the
    template drop, [L_i, D] in ``dtype`` (default: the encoder's).

    ``images`` are the VL-sized reference copies (``RefImages.vl_images``); every prompt sees all of them.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    device = device or next(text_encoder.parameters()).device
    inputs, drop = tokenize(processor, prompts, images, mode)
    check_text_length(int(inputs["attention_mask"].sum(dim=1).max()) - drop)  # before the encoder runs
    inputs = inputs.to(device)
    out = text_encoder(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
        pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
        output_hidden_states=True,
    )
    hidden = out.hidden_states[-1].to(dtype=dtype or text_encoder.dtype)
    keep = inputs["attention_mask"].bool()
    return [h[m][drop:] for h, m in zip(hidden, keep)]


def encode_prompts(text_encoder, processor, prompts: list[str] | str, images: list[Image.Image] | None = None,
                   mode: str = "pipeline", device=None, dtype=None) -> PromptEmbeds:
    """:func:`encode_prompt_pieces` as one batch, right-padded with zeros and masked."""
    return PromptEmbeds.from_pieces(encode_prompt_pieces(text_encoder, processor, prompts, images, mode, device,
                                                         dtype))
