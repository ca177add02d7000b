"""Model loading: a FireRed (Qwen-Image-Edit-Plus) Hugging Face folder from ComfyUI's model folders.

Loaded models are shared between loaders (see :func:`cached_model`): nodes that patch a model (FireRed LoRA Loader)
return a view of it rather than modify the shared one. ComfyUI's memory manager does not see these models (they are
not ComfyUI ModelPatchers): FireRed Unload Models drops them.
"""

from __future__ import annotations

import logging
import threading

import torch

from firered_core.model import OFFLOAD_MODES, FireRedModel, ModelError, load_model
from firered_core.speed import ModelSettings, SpeedSettings

from . import _comfy
from . import speed as SP
from ._errors import blame, input_error

log = logging.getLogger(__name__)

DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
DEVICE_CHOICES = ("auto", "cpu")

_cache: dict[tuple, FireRedModel] = {}
_cache_lock = threading.Lock()


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``auto``: bf16 on an accelerator (fp16 overflows on this family), fp32 on the CPU."""
    if dtype != "auto":
        return dtype
    return "fp32" if device.type == "cpu" else "bf16"


def cached_model(path, dtype: str, device: torch.device, offload: str,
                 settings: ModelSettings | None = None) -> FireRedModel:
    """One lazily loaded model per (folder, dtype, device, offload, model-level speed settings): loaders of the same
    path and settings share the weights."""
    settings = settings or ModelSettings()
    key = (str(path.resolve()), dtype, str(device), offload, settings)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = load_model(path, dtype=dtype, device=str(device), offload=offload, settings=settings)
        return _cache[key]


def unload_all() -> int:
    """Forget every cached model and drop its loaded components; returns how many models were cached.

    A model object still held elsewhere (ComfyUI's node cache) reloads its components lazily on next use.
    """
    with _cache_lock:
        models = list(_cache.values())
        _cache.clear()
    for model in models:
        model.unload()
    return len(models)


class FireRedModelLoader:
    NAME = "FireRed Model Loader"
    DESCRIPTION = ("Loads a FireRed-Image-Edit model folder (Hugging Face layout with model_index.json) from "
                   "models/firered or models/diffusers. Components load lazily on first use and are shared by "
                   "every loader of the same folder and settings.")
    CATEGORY = "FireRed"
    RETURN_TYPES = ("FIRERED_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model: transformer, VAE, Qwen2.5-VL text encoder and scheduler settings.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model_name": (_comfy.list_model_folders(), {
                "tooltip": "A folder with model_index.json, transformer/, vae/, text_encoder/, tokenizer/, "
                           "processor/ and scheduler/ inside ComfyUI/models/firered (or models/diffusers)."}),
            "dtype": (list(DTYPE_CHOICES), {
                "default": "auto",
                "tooltip": "Compute precision. auto = bf16 on a GPU, fp32 on the CPU. fp16 can overflow into "
                           "black images with this model family."}),
            "device": (list(DEVICE_CHOICES), {
                "default": "auto", "tooltip": "auto = ComfyUI's main device; cpu forces the CPU."}),
            "offload": (list(OFFLOAD_MODES), {
                "default": "none",
                "tooltip": "none keeps every component on the device; model keeps each large component in "
                           "system RAM and moves it to the device only while it runs (less VRAM, slower)."}),
        }, "optional": {
            "speed": (SP.SPEED_TYPE, {
                "tooltip": "From FireRed Speed Settings: its model-level options (quantisation, compile, block "
                           "swap, VAE tiling, embedding cache) apply to this model when each part first runs."}),
        }}

    def load(self, model_name: str, dtype: str, device: str, offload: str,
             speed: SpeedSettings | None = None) -> tuple[FireRedModel]:
        path = _comfy.find_model_folder(model_name)
        if path is None:
            searched = ", ".join(str(d) for d in _comfy.model_dirs()) or "no model folder configured"
            raise input_error(self.NAME, "model_name", f"model folder '{model_name}' not found (searched: "
                              f"{searched}). Put the Hugging Face folder of FireRed-Image-Edit in models/firered.")
        dev = _comfy.torch_device() if device == "auto" else torch.device(device)
        with blame(self.NAME, "model_name", ModelError):
            return (cached_model(path, resolve_dtype(dtype, dev), dev, offload, speed.model if speed else None),)


class FireRedUnloadModels:
    NAME = "FireRed Unload Models"
    DESCRIPTION = ("Frees the memory of every FireRed model (ComfyUI's own Unload Models button does not see "
                   "them). Connect the final image so it runs last; the models reload on their next use.")
    CATEGORY = "FireRed"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The input image, unchanged.",)
    FUNCTION = "unload"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "image": ("IMAGE", {"tooltip": "Any image of the graph's end (passed through), so that the models are "
                                           "freed after they are used."}),
        }}

    @classmethod
    def IS_CHANGED(cls, image: torch.Tensor) -> float:
        """Never cached by ComfyUI: every run frees the models again."""
        return float("nan")

    def unload(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        from .lora import unload_views

        count = unload_all() + unload_views()
        _comfy.soft_empty_cache()
        log.info("FireRed Unload Models: dropped %d cached models and LoRA views", count)
        return (image,)


NODE_CLASS_MAPPINGS = {"FireRedModelLoader": FireRedModelLoader, "FireRedUnloadModels": FireRedUnloadModels}
