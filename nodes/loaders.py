"""Model loading: a FireRed (Qwen-Image-Edit-Plus) Hugging Face folder, or single files, from ComfyUI's folders.

Loaded models are shared between loaders (see :func:`cached_model`) while a node output holds them: nodes that patch
a model (FireRed LoRA Loader) return a view of it rather than modify the shared one. Inside ComfyUI each model's
components are handed to ComfyUI's memory manager when they run (``_memory.placement``).
"""

from __future__ import annotations

import logging
import threading
import weakref
from pathlib import Path

import torch

from firered_core.formats import GGUF_MODES, FormatError
from firered_core.model import OFFLOAD_MODES, FireRedModel, ModelError, load_model
from firered_core.speed import ModelSettings, SpeedSettings

from . import _comfy, _folders, _memory
from . import speed as SP
from ._errors import blame, look_up, validate_names

log = logging.getLogger(__name__)

DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
DEVICE_CHOICES = ("auto", "cpu")

# Weak: a model lives while a node output holds it (ComfyUI's node cache), so "Free model and node cache" frees it.
_cache: "weakref.WeakValueDictionary[tuple, FireRedModel]" = weakref.WeakValueDictionary()
_cache_lock = threading.Lock()


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``auto``: bf16 on an accelerator (fp16 overflows on this family), fp32 on the CPU."""
    if dtype != "auto":
        return dtype
    return "fp32" if device.type == "cpu" else "bf16"


def cached_model(path, dtype: str, device: torch.device, offload: str, settings: ModelSettings | None = None,
                 gguf_mode: str = "runtime", **files) -> FireRedModel:
    """One lazily loaded model per (folder and/or single files, dtype, device, offload, GGUF mode, model-level speed
    settings): loaders of the same sources and settings share the weights."""
    settings = settings or ModelSettings()
    sources = tuple(sorted((k, str(Path(v).resolve())) for k, v in files.items() if v is not None))
    key = (str(Path(path).resolve()) if path is not None else None, sources, dtype, str(device), offload, gguf_mode,
           settings)
    with _cache_lock:
        if key not in _cache:
            model = load_model(path, dtype=dtype, device=str(device), offload=offload, gguf_mode=gguf_mode,
                               settings=settings, **files)
            if _comfy.IN_COMFY:
                model.placement = _memory.placement()
            _cache[key] = model
        return _cache[key]


def unload_all() -> int:
    """Forget every cached model and drop its loaded components; returns how many models were cached.

    A model object still held elsewhere (ComfyUI's node cache) reloads its components lazily on next use.
    """
    with _cache_lock:
        models = list(_cache.values())
        _cache.clear()
    for model in models:
        if isinstance(model.placement, _memory.ManagedPlacement):
            model.placement.forget()
        model.unload()
    return len(models)


def _settings_inputs() -> dict:
    """dtype / device / offload widgets, the same on both loaders."""
    return {
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
    }


def _speed_input() -> dict:
    return {"speed": (SP.SPEED_TYPE, {
        "tooltip": "From FireRed Speed Settings: its model-level options (quantisation, fp8 mode, compile, "
                   "attention kernel, block swap, VAE tiling, embedding cache) apply to this model when each part "
                   "first runs."})}


def _searched(dirs) -> str:
    return ", ".join(str(d) for d in dirs) or "no folder configured"


def missing_model_message(model_name: str) -> str:
    """What the user sees when the model folder is missing: the folders searched and what to put there."""
    dirs = _folders.model_dirs()
    where = dirs[0] if dirs else "ComfyUI/models/firered"
    have = _folders.list_model_folders()
    return (f"FireRed model folder '{model_name}' not found (searched: {_searched(dirs)}). Download the "
            f"FireRed-Image-Edit Hugging Face repository (model_index.json, transformer/, vae/, text_encoder/, "
            f"tokenizer/, processor/, scheduler/) into {where}/{model_name}, then press R to refresh; "
            + (f"installed: {', '.join(have)}. " if have else "no model folder is installed yet. ")
            + "Single files in models/diffusion_models, models/text_encoders and models/vae load with FireRed "
              "Single-File Loader instead.")


def missing_file_message(kind: str, name: str) -> str:
    """What the user sees when a single file is missing: the folders searched and what belongs there."""
    label, example = SINGLE_FILE_KINDS[kind]
    return (f"{label} file '{name}' not found (searched: {_searched(_folders.single_file_dirs(kind))}). Put "
            f"{example} in ComfyUI/models/{_folders.SINGLE_FILE_FOLDERS[kind][0]}, then press R to refresh.")


SINGLE_FILE_KINDS = {
    "transformer": ("FireRed transformer", "the FireRed-Image-Edit transformer as one file (bf16, fp8_e4m3fn, fp8 "
                                            "scaled or GGUF)"),
    "text_encoder": ("Qwen2.5-VL text encoder", "the Qwen2.5-VL-7B text encoder (e.g. qwen_2.5_vl_7b_fp8_scaled"
                                                 ".safetensors, the one ComfyUI's Qwen-Image workflows use)"),
    "vae": ("VAE", "the Qwen-Image / Wan 2.1 VAE (e.g. qwen_image_vae.safetensors)"),
}


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
            "model_name": (_folders.list_model_folders(), {
                "tooltip": "A folder with model_index.json, transformer/, vae/, text_encoder/, tokenizer/, "
                           "processor/ and scheduler/ inside ComfyUI/models/firered (or models/diffusers)."}),
            **_settings_inputs(),
        }, "optional": _speed_input()}

    @classmethod
    def VALIDATE_INPUTS(cls, model_name: str) -> bool | str:
        """Checked before the run, instead of ComfyUI's list check, so the message says what to install where."""
        return validate_names(cls.NAME, {"model_name": (_folders.find_model_folder, model_name, missing_model_message)})

    def load(self, model_name: str, dtype: str, device: str, offload: str,
             speed: SpeedSettings | None = None) -> tuple[FireRedModel]:
        path = look_up(self.NAME, "model_name", _folders.find_model_folder, model_name, missing_model_message)
        dev = _comfy.torch_device() if device == "auto" else torch.device(device)
        with blame(self.NAME, "model_name", ModelError):
            return (cached_model(path, resolve_dtype(dtype, dev), dev, offload, speed.model if speed else None),)


class FireRedSingleFileLoader:
    NAME = "FireRed Single-File Loader"
    DESCRIPTION = ("Loads FireRed from the single files ComfyUI's own loaders use: the transformer from "
                   "models/diffusion_models (or unet), the Qwen2.5-VL text encoder from models/text_encoders (or "
                   "clip), the VAE from models/vae. Formats: bf16 / fp16 / fp32, fp8 e4m3fn / e5m2, ComfyUI fp8 "
                   "scaled, GGUF. The tokenizer is ComfyUI's own Qwen2.5 tokenizer. Components load lazily and "
                   "are shared by every loader of the same files and settings.")
    CATEGORY = "FireRed"
    RETURN_TYPES = ("FIRERED_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model: transformer, VAE, Qwen2.5-VL text encoder and the published scheduler "
                       "settings.",)
    FUNCTION = "load"
    FILE_INPUTS = {"transformer_name": "transformer", "text_encoder_name": "text_encoder", "vae_name": "vae"}

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        files = {name: (_folders.list_single_files(kind), {
            "tooltip": f"{SINGLE_FILE_KINDS[kind][0]}: {SINGLE_FILE_KINDS[kind][1]}, from ComfyUI/models/"
                       f"{' or models/'.join(_folders.SINGLE_FILE_FOLDERS[kind])}."}) for name, kind in cls.FILE_INPUTS.items()}
        return {"required": {
            **files,
            **_settings_inputs(),
            "gguf_mode": (list(GGUF_MODES), {
                "default": "runtime",
                "tooltip": "GGUF transformer only: runtime keeps the weights packed and decodes each layer when it "
                           "runs (memory ~ file size); load dequantises everything when loading (faster steps, "
                           "full-size memory)."}),
        }, "optional": _speed_input()}

    @classmethod
    def VALIDATE_INPUTS(cls, transformer_name: str, text_encoder_name: str, vae_name: str) -> bool | str:
        """Checked before the run, instead of ComfyUI's list check, so the message says what to put where."""
        names = {"transformer_name": transformer_name, "text_encoder_name": text_encoder_name, "vae_name": vae_name}
        return validate_names(cls.NAME, {inp: cls._finder(kind, names[inp]) for inp, kind in cls.FILE_INPUTS.items()})

    @staticmethod
    def _finder(kind: str, name: str):
        return (lambda n: _folders.find_single_file(kind, n)), name, (lambda n: missing_file_message(kind, n))

    def load(self, transformer_name: str, text_encoder_name: str, vae_name: str, dtype: str, device: str,
             offload: str, gguf_mode: str = "runtime", speed: SpeedSettings | None = None) -> tuple[FireRedModel]:
        names = {"transformer_name": transformer_name, "text_encoder_name": text_encoder_name, "vae_name": vae_name}
        files = {}
        for inp, kind in self.FILE_INPUTS.items():
            files[kind] = look_up(self.NAME, inp, *self._finder(kind, names[inp]))
        dev = _comfy.torch_device() if device == "auto" else torch.device(device)
        with blame(self.NAME, "text_encoder_name", ModelError, FormatError):
            model = cached_model(None, resolve_dtype(dtype, dev), dev, offload, speed.model if speed else None,
                                 gguf_mode=gguf_mode,
                                 default_tokenizer=_folders.comfy_tokenizer_dir(), **files)
            model.get("processor")  # a text encoder without a usable tokenizer fails here, naming the file
        return (model,)


class FireRedUnloadModels:
    NAME = "FireRed Unload Models"
    DESCRIPTION = ("Drops every FireRed model and LoRA view at once, from the device and from RAM (ComfyUI's own "
                   "Unload Models unloads them from the device too). Connect the final image so it runs last; the "
                   "models reload on their next use.")
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


NODE_CLASS_MAPPINGS = {"FireRedModelLoader": FireRedModelLoader, "FireRedSingleFileLoader": FireRedSingleFileLoader,
                       "FireRedUnloadModels": FireRedUnloadModels}
