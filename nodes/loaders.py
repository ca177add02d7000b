"""Model loading: a FireRed (Qwen-Image-Edit-Plus) Hugging Face folder from ComfyUI's model folders.

Loaded models are shared between loaders (see :func:`cached_model`): nodes that patch a model (LoRA loaders belong in
this module) must return a new bundle rather than modify the shared one.
"""

from __future__ import annotations

import threading

import torch

from firered_core.model import OFFLOAD_MODES, FireRedModel, ModelError, load_model

from . import _comfy
from ._errors import blame, input_error

DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
DEVICE_CHOICES = ("auto", "cpu")

_cache: dict[tuple, FireRedModel] = {}
_cache_lock = threading.Lock()


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``auto``: bf16 on an accelerator (fp16 overflows on this family), fp32 on the CPU."""
    if dtype != "auto":
        return dtype
    return "fp32" if device.type == "cpu" else "bf16"


def cached_model(path, dtype: str, device: torch.device, offload: str) -> FireRedModel:
    """One lazily loaded model per (folder, dtype, device, offload): loaders of the same path share the weights."""
    key = (str(path.resolve()), dtype, str(device), offload)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = load_model(path, dtype=dtype, device=str(device), offload=offload)
        return _cache[key]


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
        }}

    def load(self, model_name: str, dtype: str, device: str, offload: str) -> tuple[FireRedModel]:
        path = _comfy.find_model_folder(model_name)
        if path is None:
            searched = ", ".join(str(d) for d in _comfy.model_dirs()) or "no model folder configured"
            raise input_error(self.NAME, "model_name", f"model folder '{model_name}' not found (searched: "
                              f"{searched}). Put the Hugging Face folder of FireRed-Image-Edit in models/firered.")
        dev = _comfy.torch_device() if device == "auto" else torch.device(device)
        with blame(self.NAME, "model_name", ModelError):
            return (cached_model(path, resolve_dtype(dtype, dev), dev, offload),)


NODE_CLASS_MAPPINGS = {"FireRedModelLoader": FireRedModelLoader}
