"""More than three pictures: crop each to its region of interest, pack them into 2-3 composites, rewrite the
instruction's picture mentions (``firered_core.packing``)."""

from __future__ import annotations

import logging

import torch

from firered_core import masks as M
from firered_core import packing as PK
from firered_core.limits import widget

from . import _comfy
from ._errors import blame, check_inputs
from .image import image_size

SLOTS = 8
COMPOSITES = ("auto", "1", "2", "3")

log = logging.getLogger(__name__)


class FireRedPackPictures:
    NAME = "FireRed Pack Pictures"
    DESCRIPTION = ("For more than 3 pictures (FireRed is trained on 1-3): crops each picture to its region of "
                   "interest (a box you give, else the non-background content), packs the crops into 2-3 composites "
                   "of about 1 MP each (no cropping of the crops, little white, the same layout every time) and "
                   "rewrites 'Picture 5' / 'image 5' / '图5' in the instruction to the composite and position "
                   "('the second item (right) of Picture 2'). The table output shows the mapping.")
    CATEGORY = "FireRed"
    RETURN_TYPES = ("IMAGE", "IMAGE", "IMAGE", "STRING", "STRING")
    RETURN_NAMES = ("picture1", "picture2", "picture3", "prompt", "table")
    OUTPUT_TOOLTIPS = ("Composite 1 ('Picture 1' of the rewritten instruction).",
                       "Composite 2 (empty when only one composite is made).",
                       "Composite 3 (empty when fewer are made: leave the reference slot it feeds optional).",
                       "The instruction with its picture mentions rewritten; connect it to FireRed Encode "
                       "Instruction's prompt.",
                       "Which picture went where (connect to Preview Any to read it).")
    FUNCTION = "pack"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        slot = "Picture {} of the instruction (a batch adds one picture per image)."
        return {
            "required": {
                "image1": ("IMAGE", {"tooltip": slot.format(1)}),
                "prompt": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "The instruction, naming the pictures as 'Picture N', 'image N' or "
                                                 "'图N' in the order of the inputs."}),
                "composites": (list(COMPOSITES), {
                    "default": "auto", "tooltip": "How many composites: auto = 2 for 4 pictures, 3 from 5 on."}),
                "megapixels": ("FLOAT", {"default": 1.0, **widget("pack_megapixels"), "step": 0.05,
                                         "tooltip": "Area of each composite in units of 1024x1024 pixels."}),
                "auto_crop": ("BOOLEAN", {"default": True,
                                          "tooltip": "Crop pictures without a box to their non-background content "
                                                     "(off: keep them whole)."}),
                "boxes": ("STRING", {"multiline": True, "default": "",
                                     "tooltip": "Optional regions of interest, one per line: 'N: x0,y0,x1,y1' in "
                                                "pixels of picture N, e.g. '5: 10,20,300,400'."}),
            },
            "optional": {
                **{f"image{k}": ("IMAGE", {"tooltip": slot.format(k)}) for k in range(2, SLOTS + 1)},
                **{f"mask{k}": ("MASK", {"tooltip": f"Optional region of interest of image{k} (painted = keep; the "
                                                    "crop is its bounding box). A box line for that picture wins; an "
                                                    "empty mask is ignored."}) for k in range(1, SLOTS + 1)},
                "recaption_url": ("STRING", {"default": "",
                                             "tooltip": "Optional: an OpenAI-compatible endpoint (e.g. "
                                                        "https://api.openai.com/v1) that rephrases the rewritten "
                                                        "instruction naturally. Empty = off. Replies are cached."}),
                "recaption_model": ("STRING", {"default": "", "tooltip": "The endpoint's model name."}),
                "recaption_key_env": ("STRING", {"default": "OPENAI_API_KEY",
                                                 "tooltip": "Environment variable holding the API key (the key "
                                                            "itself is never stored in the workflow)."}),
            },
        }

    def pack(self, image1: torch.Tensor, prompt: str, composites: str, megapixels: float, auto_crop: bool,
             boxes: str, recaption_url: str = "", recaption_model: str = "",
             recaption_key_env: str = "OPENAI_API_KEY", **images: torch.Tensor | None) -> tuple:
        check_inputs(self.NAME, {"megapixels": megapixels}, limits={"megapixels": "pack_megapixels"})
        pictures, masks = [], {}
        for k in range(1, SLOTS + 1):
            image = image1 if k == 1 else images.get(f"image{k}")
            if image is None:
                continue
            image_size(self.NAME, f"image{k}", image)
            mask = images.get(f"mask{k}")
            if mask is not None:
                with blame(self.NAME, f"mask{k}"):
                    mask = M.fit_batch(M.as_mask(mask.cpu()), image.shape[0], f"mask{k}")
                for i, m in enumerate(mask):
                    if bool((m > 0.5).any()):  # LoadImage's mask of an unpainted picture is all zero: no region
                        masks[len(pictures) + i + 1] = m[None]
            pictures += list(image[..., :3].cpu().float())
        with blame(self.NAME, "boxes"):
            parsed = PK.parse_boxes(boxes)
        with blame(self.NAME, "image1", inputs=("boxes", "composites")):
            result = PK.pack_pictures(pictures, boxes=parsed, masks=masks,
                                      composites=None if composites == "auto" else int(composites),
                                      area=megapixels * 1024 * 1024, auto_roi=auto_crop)
        with blame(self.NAME, "prompt"):
            rewritten = result.rewrite(prompt)
        if recaption_url.strip() or recaption_model.strip():
            from firered_core.llm import ChatClient
            from firered_core.recaption import endpoint, recaption

            with blame(self.NAME, "recaption_url"):
                client = ChatClient(endpoint(recaption_url.strip(), recaption_model.strip(), recaption_key_env))
                rewritten = recaption(client, prompt, rewritten, result)
        table = result.table()
        log.info("%s: %d pictures -> %d composites\n%s\ninstruction: %s", self.NAME, len(pictures),
                 len(result.composites), table, rewritten)
        device = _comfy.intermediate_device()
        out = [c[None].to(device) for c in result.composites] + [None] * (3 - len(result.composites))
        return (*out, rewritten, table)


NODE_CLASS_MAPPINGS = {"FireRedPackPictures": FireRedPackPictures}
