"""VAE decode and encode between IMAGE and ComfyUI's raw 5-D LATENT for the Wan 2.1 VAE family."""

from __future__ import annotations

import torch

from firered_core import comfy_latents as CL
from firered_core.model import FireRedModel
from firered_core.pipeline import decode_raw
from firered_core.references import encode_image, vae_range

from . import _comfy
from ._errors import blame, input_error
from .image import image_size


class FireRedDecode:
    NAME = "FireRed Decode"
    DESCRIPTION = ("Decodes a LATENT with FireRed's VAE (Wan 2.1). The latent is ComfyUI's raw 5-D kind, so "
                   "ComfyUI's own VAE Decode with the same VAE gives the same picture.")
    CATEGORY = "FireRed"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The decoded images.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("FIRERED_MODEL", {"tooltip": "From FireRed Model Loader (its VAE is used)."}),
            "latent": ("LATENT", {"tooltip": "From FireRed Sampler, or any 16-channel Wan 2.1 latent."}),
        }}

    def decode(self, model: FireRedModel, latent: dict) -> tuple[torch.Tensor]:
        with blame(self.NAME, "latent"):
            samples = CL.check_raw(latent["samples"])
        with model.use("vae") as vae:
            images = decode_raw(vae, samples.to(model.device))
        _comfy.soft_empty_cache()
        return (images.permute(0, 2, 3, 1).to(_comfy.intermediate_device()),)


class FireRedVAEEncode:
    NAME = "FireRed VAE Encode"
    DESCRIPTION = ("Encodes images into a raw 5-D LATENT (the posterior's mode), e.g. to start FireRed Sampler "
                   "from an image with denoise < 1. Sides must be multiples of 16: use FireRed Pad Image first.")
    CATEGORY = "FireRed"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Raw (un-normalised) 5-D latent.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("FIRERED_MODEL", {"tooltip": "From FireRed Model Loader (its VAE is used)."}),
            "image": ("IMAGE", {"tooltip": "Images with width and height multiples of 16."}),
        }}

    def encode(self, model: FireRedModel, image: torch.Tensor) -> tuple[dict]:
        width, height = image_size(self.NAME, "image", image)
        if width % 16 or height % 16:
            raise input_error(self.NAME, "image", f"{width}x{height} is not a multiple of 16 on each side; "
                              "pad it with FireRed Pad Image (and crop back after decoding)")
        pixels = vae_range(image)
        with model.use("vae") as vae:
            z = encode_image(vae, pixels.to(device=model.device, dtype=model.dtype))
        _comfy.soft_empty_cache()
        return ({"samples": z.float().to(_comfy.intermediate_device())},)


NODE_CLASS_MAPPINGS = {"FireRedDecode": FireRedDecode, "FireRedVAEEncode": FireRedVAEEncode}
