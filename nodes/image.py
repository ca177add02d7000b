"""Resolution without pixel shift: output sizes, padding to a multiple of 16 with a record, and cropping back."""

from __future__ import annotations

import torch

from firered_core import geometry as G
from firered_core import latents as L
from firered_core import masks as M
from firered_core import stitch as ST
from firered_core.limits import widget

from . import _comfy
from ._errors import blame, check_inputs, input_error

SIZE_MODES = ("match input", "megapixels", "width x height")
CROP_TOOLTIP = "The padding record made with the image; crop back with FireRed Crop Back."


def empty_latent(width: int, height: int) -> dict:
    """A zero LATENT (raw, 5-D) of ``width`` x ``height`` pixels, multiples of 16."""
    z = torch.zeros(1, 16, 1, height // L.VAE_SCALE, width // L.VAE_SCALE, device=_comfy.intermediate_device())
    return {"samples": z}


def image_size(node: str, name: str, image: torch.Tensor) -> tuple[int, int]:
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] not in (3, 4):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise input_error(node, name, f"expected an IMAGE [batch, height, width, 3], got {shape}")
    if image.shape[0] == 0 or image.shape[1] == 0 or image.shape[2] == 0:
        raise input_error(node, name, f"the IMAGE is empty (shape {tuple(image.shape)}): the node before it "
                          "produced no picture")
    return image.shape[2], image.shape[1]


class FireRedImageSize:
    NAME = "FireRed Image Size"
    DESCRIPTION = ("Chooses the output size and gives an empty LATENT of it. 'match input' pads the image's size up "
                   "to a multiple of 16 and records the padding, so FireRed Crop Back returns exactly the input's "
                   "size with no zoom and no shift. 'megapixels' follows the pipeline: that area at the image's "
                   "aspect ratio (1.0 = the official default). 'width x height' gives any exact size.")
    CATEGORY = "FireRed"
    RETURN_TYPES = ("LATENT", "FIRERED_CROP", "INT", "INT")
    RETURN_NAMES = ("latent", "crop", "width", "height")
    OUTPUT_TOOLTIPS = ("Empty latent at the generation size (multiples of 16).", CROP_TOOLTIP,
                       "Final width after cropping back.", "Final height after cropping back.")
    FUNCTION = "size"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "mode": (list(SIZE_MODES), {"default": "match input", "tooltip": cls.DESCRIPTION}),
                "megapixels": ("FLOAT", {"default": 1.0, **widget("megapixels"), "step": 0.01,
                                         "tooltip": "For 'megapixels': output area in units of 1024x1024 pixels, "
                                                    "at the image's aspect ratio (square without an image)."}),
                "width": ("INT", {"default": 1024, **widget("side"), "step": 1,
                                  "tooltip": "For 'width x height': exact output width in pixels."}),
                "height": ("INT", {"default": 1024, **widget("side"), "step": 1,
                                   "tooltip": "For 'width x height': exact output height in pixels."}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "The image whose size (match input) or aspect ratio (megapixels) "
                                               "the output follows; usually the last reference image."}),
            },
        }

    def size(self, mode: str, megapixels: float, width: int, height: int, image: torch.Tensor | None = None
             ) -> tuple[dict, G.PadRecord, int, int]:
        check_inputs(self.NAME, {"megapixels": megapixels, "width": width, "height": height},
                     {"width": "side", "height": "side"})
        source = None if image is None else image_size(self.NAME, "image", image)
        if mode == "match input":
            if source is None:
                raise input_error(self.NAME, "image", "'match input' needs an image connected")
            record = G.pad_record(*source)
        elif mode == "megapixels":
            record = G.pad_record(*G.default_output_size(source, megapixels * 1024 * 1024))
        else:
            record = G.pad_record(width, height)
        return (empty_latent(record.padded_width, record.padded_height), record, record.width, record.height)


class FireRedPadImage:
    NAME = "FireRed Pad Image"
    DESCRIPTION = ("Pads an image to a multiple of 16 (edge pixels repeated, image centred) and records where it "
                   "sits, so FireRed Crop Back can return exactly the original pixels' positions and size.")
    CATEGORY = "FireRed"
    RETURN_TYPES = ("IMAGE", "FIRERED_CROP")
    RETURN_NAMES = ("image", "crop")
    OUTPUT_TOOLTIPS = ("The padded image.", CROP_TOOLTIP)
    FUNCTION = "pad"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"image": ("IMAGE", {"tooltip": "Image of any size."})}}

    def pad(self, image: torch.Tensor) -> tuple[torch.Tensor, G.PadRecord]:
        image_size(self.NAME, "image", image)
        return G.pad_to_multiple(image)


class FireRedPadMask:
    NAME = "FireRed Pad Mask"
    DESCRIPTION = ("Brings an image's mask to the generation size the way its image was brought there: stretched "
                   "to the image's size (a mask of another size, e.g. LoadImage's empty 64x64 one), then padded like "
                   "FireRed Pad Image / Image Size 'match input' (edges repeated). Feed it to Set Latent Noise Mask.")
    CATEGORY = "FireRed"
    RETURN_TYPES = ("MASK",)
    RETURN_NAMES = ("mask",)
    OUTPUT_TOOLTIPS = ("The mask at the padded (generation) size.",)
    FUNCTION = "pad"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "mask": ("MASK", {"tooltip": "1 = edit, 0 = keep; any size (stretched to the image)."}),
            "crop": ("FIRERED_CROP", {"tooltip": "The padding record of the image (FireRed Pad Image or FireRed "
                                                 "Image Size)."}),
        }}

    def pad(self, mask: torch.Tensor, crop: G.PadRecord) -> tuple[torch.Tensor]:
        with blame(self.NAME, "mask"):
            mask = M.resize_mask(mask.cpu(), crop.width, crop.height)
        return (G.pad_to_multiple(mask[..., None])[0][..., 0].to(_comfy.intermediate_device()),)


class FireRedCropBack:
    NAME = "FireRed Crop Back"
    DESCRIPTION = ("Removes the recorded padding: the result has the original size and every pixel where it was. "
                   "An image generated at another size is first resized to the padded size.")
    CATEGORY = "FireRed"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The image at the recorded original size.",)
    FUNCTION = "crop"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The decoded (padded-size) image."}),
            "crop": ("FIRERED_CROP", {"tooltip": "From FireRed Image Size or FireRed Pad Image."}),
        }}

    def crop(self, image: torch.Tensor, crop: G.PadRecord) -> tuple[torch.Tensor]:
        image_size(self.NAME, "image", image)
        return (G.crop_back(image, crop),)


class FireRedStitchImages:
    NAME = "FireRed Stitch Images"
    DESCRIPTION = ("Combines several pictures into one on a white background (nothing cropped), so that more "
                   "pictures than the 3 reference slots can be given, as FireRed's own agent does.")
    CATEGORY = "FireRed"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("One stitched picture, to use as one reference image.",)
    FUNCTION = "stitch"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        slot = "Picture to stitch (a batch adds each of its images)."
        return {
            "required": {
                "image1": ("IMAGE", {"tooltip": slot}),
                "layout": (list(ST.LAYOUTS), {"default": "row",
                                              "tooltip": "row: side by side at a common height; column: stacked "
                                                         "at a common width; grid: square cells."}),
                "size": ("INT", {"default": 1024, **widget("stitch_size"), "step": 16,
                                 "tooltip": "Common height (row), width (column) or cell side (grid) in pixels."}),
                "gap": ("INT", {"default": 0, **widget("stitch_gap"),
                                "tooltip": "White pixels between the pictures."}),
            },
            "optional": {f"image{k}": ("IMAGE", {"tooltip": slot}) for k in (2, 3, 4)},
        }

    def stitch(self, image1: torch.Tensor, layout: str, size: int, gap: int, image2: torch.Tensor | None = None,
               image3: torch.Tensor | None = None, image4: torch.Tensor | None = None) -> tuple[torch.Tensor]:
        check_inputs(self.NAME, {"size": size, "gap": gap}, {"size": "stitch_size", "gap": "stitch_gap"})
        pictures = []
        for name, image in (("image1", image1), ("image2", image2), ("image3", image3), ("image4", image4)):
            if image is not None:
                image_size(self.NAME, name, image)
                pictures += list(image[..., :3].cpu())
        with blame(self.NAME, "layout"):
            return (ST.stitch(pictures, layout, size, gap)[None],)


class FireRedMaskedComposite:
    NAME = "FireRed Masked Composite"
    DESCRIPTION = ("Finishes a masked edit: puts the edited image back onto the source through the mask, so every "
                   "pixel outside the mask is the source's own (bit for bit). 'feather' fades the edit in over that "
                   "many pixels inside the mask's border; 'color_match' first undoes the edit's colour drift, "
                   "measured outside the mask.")
    CATEGORY = "FireRed"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The source with the edit inside the mask.",)
    FUNCTION = "composite"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The edited images (after FireRed Crop Back; another size is resized "
                                           "to the source's)."}),
            "source": ("IMAGE", {"tooltip": "The original image (one, or one per edited image)."}),
            "mask": ("MASK", {"tooltip": "1 = edited, 0 = kept (any size: stretched to the source); the mask "
                                         "the edit was made with."}),
            "feather": ("INT", {"default": 8, "min": 0, "max": 256,
                                "tooltip": "Pixels over which the edit fades in inside the mask's border (0 = "
                                           "hard edge). Outside the mask nothing changes either way."}),
            "color_match": (list(M.COLOR_MATCH), {
                "default": "off",
                "tooltip": "Undo the edit's colour/brightness drift, measured where the result should equal the "
                           "source: mean-std (mean and spread per channel in Lab) or histogram (per RGB channel)."}),
        }}

    def composite(self, image: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, feather: int,
                  color_match: str) -> tuple[torch.Tensor]:
        image_size(self.NAME, "image", image)
        width, height = image_size(self.NAME, "source", source)
        if source.shape[0] not in (1, image.shape[0]):
            raise input_error(self.NAME, "source", f"{source.shape[0]} source images for {image.shape[0]} edited "
                              "ones; give one source or one per edited image")
        edited = M.resize_image(image[..., :3].cpu().float(), width, height)
        with blame(self.NAME, "mask"):
            mask = M.fit_batch(M.resize_mask(mask.cpu(), width, height), image.shape[0])
        M.warn_if_empty(mask, f"{self.NAME}: input 'mask'")
        out = M.finish(edited, source[..., :3].cpu().float(), mask, feather, color_match)
        return (out.to(_comfy.intermediate_device()),)


NODE_CLASS_MAPPINGS = {
    "FireRedPadMask": FireRedPadMask,
    "FireRedMaskedComposite": FireRedMaskedComposite,
    "FireRedImageSize": FireRedImageSize,
    "FireRedStitchImages": FireRedStitchImages,
    "FireRedPadImage": FireRedPadImage,
    "FireRedCropBack": FireRedCropBack,
}
