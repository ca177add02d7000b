"""LoRA loading: a file from ComfyUI's ``loras`` folder on a view of the model (the shared model stays untouched)."""

from __future__ import annotations

import logging
import threading
import weakref

from firered_core.formats import FormatError
from firered_core.lora import LoraError, LoraSpec, applied_loras, model_with_loras
from firered_core.model import FireRedModel
from firered_core.limits import widget

from . import _folders
from ._errors import blame, check_inputs, look_up, validate_names

log = logging.getLogger(__name__)

MODES = ("auto", "adapter", "merge")
_views: list[weakref.ref] = []
_views_lock = threading.Lock()


def unload_views() -> int:
    """Drop the patched transformer of every live LoRA view (rebuilt on next use); returns how many."""
    with _views_lock:
        live = [v for v in (ref() for ref in _views) if v is not None]
        _views[:] = [weakref.ref(v) for v in live]
    for view in live:
        view.unload()
    return len(live)


def missing_lora_message(lora_name: str) -> str:
    searched = ", ".join(str(d) for d in _folders.lora_dirs()) or "no LoRA folder configured"
    have = _folders.list_loras()
    return (f"LoRA file '{lora_name}' not found (searched: {searched}). Put the LoRA file (.safetensors, made for "
            "FireRed-Image-Edit / Qwen-Image-Edit) in ComfyUI/models/loras, then press R to refresh"
            + (f"; installed: {', '.join(have[:10])}." if have else "; no LoRA file is installed yet."))


class FireRedLoraLoader:
    NAME = "FireRed LoRA Loader"
    DESCRIPTION = ("Applies a LoRA from models/loras to the transformer, with a coverage report. Chain several "
                   "to stack them. The incoming model is not changed: other branches of the graph keep using it "
                   "as it was, and the text encoder and VAE are shared, not copied. A LoRA whose keys do not all "
                   "match is refused unless allow_partial is on.")
    CATEGORY = "FireRed"
    RETURN_TYPES = ("FIRERED_MODEL", "STRING")
    RETURN_NAMES = ("model", "report")
    OUTPUT_TOOLTIPS = ("The model with the LoRA applied (the input model is unchanged).",
                       "Coverage: keys matched / unmatched and modules touched, per LoRA.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("FIRERED_MODEL", {"tooltip": "From FireRed Model Loader or another FireRed LoRA Loader."}),
            "lora_name": (_folders.list_loras(), {
                "tooltip": "A LoRA file in ComfyUI/models/loras (.safetensors): diffusers / PEFT, ComfyUI, kohya / "
                           "musubi-tuner, DiffSynth key styles; LoKr and LoHa too."}),
            "strength": ("FLOAT", {"default": 1.0, **widget("lora_strength"), "step": 0.01,
                                   "tooltip": "How much of the LoRA to add (negative subtracts it)."}),
            "mode": (list(MODES), {
                "default": "auto",
                "tooltip": "merge: added into a private copy of each touched weight (no extra compute; those "
                           "weights take twice their memory while the unpatched model is loaded too). adapter: "
                           "computed beside each layer at every step (only the LoRA's own memory; a little slower). "
                           "auto: adapter for GGUF-quantised transformers, merge otherwise."}),
            "allow_partial": ("BOOLEAN", {
                "default": False,
                "tooltip": "Apply the LoRA even if some of its keys match no layer of this model (they are named "
                           "in the report). Off: such a LoRA is refused, since it is probably for another model."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name: str) -> bool | str:
        """Checked before the run, instead of ComfyUI's list check, so the message says where LoRA files go."""
        return validate_names(cls.NAME, {"lora_name": (_folders.find_lora, lora_name, missing_lora_message)})

    def load(self, model: FireRedModel, lora_name: str, strength: float, mode: str,
             allow_partial: bool) -> tuple[FireRedModel, str]:
        check_inputs(self.NAME, {"strength": strength}, {"strength": "lora_strength"})
        path = look_up(self.NAME, "lora_name", _folders.find_lora, lora_name, missing_lora_message)
        spec = LoraSpec(path=path, strength=strength, name=lora_name)
        with blame(self.NAME, "lora_name", LoraError, FormatError):
            view, report = model_with_loras(model, [spec], None if mode == "auto" else mode, allow_partial)
        with _views_lock:
            _views.append(weakref.ref(view))
        stack = ", ".join(f"{name} ({s:g}, {m})" for name, s, m in applied_loras(view.transformer))
        text = f"mode: {report.mode}\n{report.summary()}\nLoRAs on this model: {stack}"
        if view.lora_schedule is not None:
            text += (f"\nsampling schedule: {view.lora_schedule.describe()} (FireRed Sampler uses it instead of its "
                     "steps / true_cfg)")
        log.info("%s: %s", self.NAME, text)
        return view, text


NODE_CLASS_MAPPINGS = {"FireRedLoraLoader": FireRedLoraLoader}
