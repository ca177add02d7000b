"""FireRed-Image-Edit nodes for ComfyUI: thin adapters over ``firered_core``, one stage per node."""

from __future__ import annotations

from . import _folders, decode, encode, image, loaders, lora, pack, sample, speed

_folders.register_model_folders()
_folders.install_example_inputs()

NODE_CLASS_MAPPINGS: dict[str, type] = {
    **loaders.NODE_CLASS_MAPPINGS,
    **lora.NODE_CLASS_MAPPINGS,
    **speed.NODE_CLASS_MAPPINGS,
    **encode.NODE_CLASS_MAPPINGS,
    **sample.NODE_CLASS_MAPPINGS,
    **decode.NODE_CLASS_MAPPINGS,
    **image.NODE_CLASS_MAPPINGS,
    **pack.NODE_CLASS_MAPPINGS,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {key: cls.NAME for key, cls in NODE_CLASS_MAPPINGS.items()}
