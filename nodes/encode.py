"""Reference images (VL and VAE copies, VAE-encoded) and the instruction (Qwen2.5-VL) encoders."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from firered_core import geometry as G
from firered_core.conditioning import PROMPT_MODES, PromptEmbeds
from firered_core.images import tensor_to_pil
from firered_core.model import FireRedModel
from firered_core.pipeline import encode_instructions, encode_reference_latents
from firered_core.references import NATIVE_MAX_REFERENCES, RefImages, RefLatents, prepare_references
from firered_core.limits import widget

from ._errors import blame, check_inputs, input_error
from .image import image_size

VAE_SIZING = ("area", "match input")
MODEL_TOOLTIP = "From FireRed Model Loader."


@dataclass
class References:
    """FIRERED_REFS: the prepared reference images and their packed VAE tokens."""

    images: RefImages
    latents: RefLatents


@dataclass
class Conditioning:
    """FIRERED_COND: instruction embeddings and the references they were encoded with (None = text-to-image)."""

    embeds: PromptEmbeds
    refs: References | None
    prompt: str
    mode: str


class FireRedReferenceImages:
    NAME = "FireRed Reference Images"
    DESCRIPTION = ("Prepares up to 3 reference images as the pipeline does: a small copy for the Qwen2.5-VL "
                   "encoder and a large copy encoded by the VAE. Image k is 'Picture k' in the instruction.")
    CATEGORY = "FireRed"
    RETURN_TYPES = ("FIRERED_REFS",)
    RETURN_NAMES = ("refs",)
    OUTPUT_TOOLTIPS = ("Encoded references for FireRed Encode Instruction.",)
    FUNCTION = "prepare"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        slot = "Reference image {} ('Picture {}' in the instruction); a batch adds one reference per image."
        return {
            "required": {
                "model": ("FIRERED_MODEL", {"tooltip": MODEL_TOOLTIP}),
                "vl_size": ("INT", {"default": 384, **widget("vl_size"), "step": 8,
                                    "tooltip": "Side of the square area the VL encoder's copy is resized to "
                                               "(aspect kept; 384 = the pipeline's 384x384 area)."}),
                "vae_sizing": (list(VAE_SIZING), {
                    "default": "area",
                    "tooltip": "area: the VAE copy is resized to vae_size x vae_size pixels of area (pipeline). "
                               "match input: no resize, only padded to a multiple of 16, so it lines up pixel for "
                               "pixel with a 'match input' output."}),
                "vae_size": ("INT", {"default": 1024, **widget("vae_size"), "step": 32,
                                     "tooltip": "Side of the square area of the VAE copy for 'area' sizing "
                                                "(1024 = the pipeline's ~1 MP)."}),
            },
            "optional": {f"image{k}": ("IMAGE", {"tooltip": slot.format(k, k)}) for k in (1, 2, 3)},
        }

    def prepare(self, model: FireRedModel, vl_size: int, vae_sizing: str, vae_size: int,
                image1: torch.Tensor | None = None, image2: torch.Tensor | None = None,
                image3: torch.Tensor | None = None) -> tuple[References]:
        check_inputs(self.NAME, {"vl_size": vl_size, "vae_size": vae_size})
        pictures, exact = [], []
        for name, image in (("image1", image1), ("image2", image2), ("image3", image3)):
            if image is None:
                continue
            image_size(self.NAME, name, image)
            if len(pictures) + image.shape[0] > NATIVE_MAX_REFERENCES:
                raise input_error(self.NAME, name, f"{len(pictures) + image.shape[0]} reference images in all; "
                                  f"FireRed takes at most {NATIVE_MAX_REFERENCES}: combine some into one picture "
                                  "with FireRed Stitch Images, or send fewer")
            for frame in image[..., :3]:
                if vae_sizing == "match input":
                    frame, record = G.pad_to_multiple(frame[None])
                    frame = frame[0]
                    exact.append((record.padded_width, record.padded_height))
                pictures.append(tensor_to_pil(frame))
        if not pictures:
            raise input_error(self.NAME, "image1", "connect at least one image (for text-to-image, leave the "
                              "refs input of FireRed Encode Instruction empty instead)")
        refs = prepare_references(pictures, vl_size * vl_size, vae_size * vae_size, vae_sizes=exact or None)
        latents = encode_reference_latents(model, refs, model.dtype)
        return (References(refs, latents),)


class FireRedEncodeInstruction:
    NAME = "FireRed Encode Instruction"
    DESCRIPTION = ("Encodes an instruction with Qwen2.5-VL, seeing the reference images, as the pipeline does. "
                   "Use it twice: once for the instruction (positive) and once for the negative prompt (' ' by "
                   "default) with the same references. With no references it encodes a text-to-image prompt.")
    CATEGORY = "FireRed"
    RETURN_TYPES = ("FIRERED_COND",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("Conditioning for FireRed Sampler.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("FIRERED_MODEL", {"tooltip": MODEL_TOOLTIP}),
                "prompt": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "The edit instruction; refer to references as 'Picture 1', "
                                                 "'Picture 2', ... For the negative prompt the pipeline uses ' '."}),
                "prompt_mode": (list(PROMPT_MODES), {
                    "default": "pipeline",
                    "tooltip": "pipeline: images announced as 'Picture N:' (official inference). chat: the "
                               "training extractor's chat-template form without labels."}),
            },
            "optional": {
                "refs": ("FIRERED_REFS", {"tooltip": "From FireRed Reference Images; leave empty for "
                                                     "text-to-image."}),
            },
        }

    def encode(self, model: FireRedModel, prompt: str, prompt_mode: str, refs: References | None = None
               ) -> tuple[Conditioning]:
        with blame(self.NAME, "prompt", inputs=("prompt_mode",)):
            embeds = encode_instructions(model, [prompt], refs.images if refs is not None else None, prompt_mode)
        return (Conditioning(embeds, refs, prompt, prompt_mode),)


NODE_CLASS_MAPPINGS = {
    "FireRedReferenceImages": FireRedReferenceImages,
    "FireRedEncodeInstruction": FireRedEncodeInstruction,
}
