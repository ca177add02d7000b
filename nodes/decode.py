"""VAE decode and encode between IMAGE and ComfyUI's raw 5-D LATENT for the Wan 2.1 VAE family.

Both nodes take FireRed's model (its VAE) or ComfyUI's own VAE (Load VAE with qwen_image_vae.safetensors): the input
type is the union ``FIRERED_MODEL,VAE``, which ComfyUI's validation and canvas accept from either output.
"""

from __future__ import annotations

import torch

from firered_core import comfy_latents as CL
from firered_core.model import FireRedModel
from firered_core.pipeline import decode_raw
from firered_core.references import encode_image, vae_range

from . import _comfy
from ._errors import blame, input_error
from .image import image_size

VAE_TYPE = "FIRERED_MODEL,VAE"
VAE_TOOLTIP = ("From FireRed Model Loader (its VAE is used), or ComfyUI's own VAE from Load VAE (the Qwen-Image / "
               "Wan 2.1 VAE, e.g. qwen_image_vae.safetensors).")


def _native(vae) -> bool:
    """ComfyUI's VAE object (duck-typed: comfy.sd.VAE's encode/decode on IMAGE-layout tensors)."""
    return not isinstance(vae, FireRedModel) and callable(getattr(vae, "decode", None))


def _check_vae(node: str, vae) -> None:
    if not isinstance(vae, FireRedModel) and not _native(vae):
        raise input_error(node, "model", f"expected a FireRed model or a VAE, got {type(vae).__name__}")


def noise_mask(node: str, mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """ComfyUI's MASK ([H, W] or [B, H, W], 1 = change) as a LATENT ``noise_mask`` ([B, 1, H, W]), the layout of
    ComfyUI's Set Latent Noise Mask: samplers resize it to the latent themselves."""
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3:
        raise input_error(node, "mask", f"expected a MASK [batch, height, width], got shape {tuple(mask.shape)}")
    if tuple(mask.shape[1:]) != (height, width):
        raise input_error(node, "mask", f"the mask is {mask.shape[2]}x{mask.shape[1]} but the image is "
                          f"{width}x{height}; give the mask of this image (pad it the same way)")
    return mask.reshape(-1, 1, height, width).float().to(_comfy.intermediate_device())


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
            "model": (VAE_TYPE, {"tooltip": VAE_TOOLTIP}),
            "latent": ("LATENT", {"tooltip": "From FireRed Sampler, or any 16-channel Wan 2.1 latent."}),
        }}

    def decode(self, model, latent: dict) -> tuple[torch.Tensor]:
        _check_vae(self.NAME, model)
        with blame(self.NAME, "latent"):
            samples = CL.check_raw(latent["samples"])
        if _native(model):
            images = _comfy.native_vae_decode(model, samples)
            return (images.to(_comfy.intermediate_device()),)
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
            "model": (VAE_TYPE, {"tooltip": VAE_TOOLTIP}),
            "image": ("IMAGE", {"tooltip": "Images with width and height multiples of 16 (RGB; an alpha channel "
                                           "is ignored)."}),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "Optional, e.g. from Load Image or the mask editor (1 = change): stored as "
                                         "the latent's noise mask, as ComfyUI's Set Latent Noise Mask does, so "
                                         "FireRed Sampler (and KSampler) change only the masked area."}),
        }}

    def encode(self, model, image: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[dict]:
        _check_vae(self.NAME, model)
        width, height = image_size(self.NAME, "image", image)
        if width % 16 or height % 16:
            raise input_error(self.NAME, "image", f"{width}x{height} is not a multiple of 16 on each side; "
                              "pad it with FireRed Pad Image (and crop back after decoding)")
        out = {} if mask is None else {"noise_mask": noise_mask(self.NAME, mask, height, width)}
        if _native(model):
            z = _comfy.native_vae_encode(model, image[..., :3])
            return ({"samples": CL.check_raw(z).float().to(_comfy.intermediate_device()), **out},)
        pixels = vae_range(image)
        with model.use("vae") as vae:
            z = encode_image(vae, pixels.to(device=model.device, dtype=model.dtype))
        _comfy.soft_empty_cache()
        return ({"samples": z.float().to(_comfy.intermediate_device()), **out},)


NODE_CLASS_MAPPINGS = {"FireRedDecode": FireRedDecode, "FireRedVAEEncode": FireRedVAEEncode}
