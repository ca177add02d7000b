"""Helpers for the node tests: the pack imported as ComfyUI imports it, an object_info built from the nodes, a
UI -> API workflow converter (the nodes' widget order, control_after_generate slots skipped) and an executor that
runs an API prompt in dependency order, checking every node's outputs against its RETURN_TYPES."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "firered_pack"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
UI_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


def load_pack():
    """Import the repository root as a custom-node package, the way ComfyUI's ``load_custom_node`` does."""
    if PACK_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_NAME, ROOT / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK_NAME]


def submodule(name: str):
    load_pack()
    return sys.modules[f"{PACK_NAME}.nodes.{name}"]


class LoadImage:
    """Stand-in for ComfyUI's LoadImage: pictures come from ``LoadImage.pictures`` by name."""

    pictures: dict[str, Image.Image] = {}
    masks: dict[str, torch.Tensor] = {}  # painted masks (1 = painted); none = ComfyUI's empty 64x64 mask
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("IMAGE", "MASK")
    FUNCTION = "load"
    CATEGORY = "image"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": (sorted(cls.pictures), {"image_upload": True})}}

    def load(self, image):
        arr = np.asarray(self.pictures[image].convert("RGB"), dtype=np.float32) / 255.0
        t = torch.from_numpy(arr)[None]
        return t, self.masks.get(image, torch.zeros(64, 64))[None].float()


class GrowMask:
    """Stand-in for ComfyUI's GrowMask: ``expand`` pixels of dilation (< 0: erosion), square or tapered corners."""

    RETURN_TYPES = ("MASK",)
    RETURN_NAMES = ("MASK",)
    FUNCTION = "expand_mask"
    CATEGORY = "mask"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": ("MASK",), "expand": ("INT", {"default": 0, "min": -16384, "max": 16384}),
                             "tapered_corners": ("BOOLEAN", {"default": True})}}

    def expand_mask(self, mask, expand, tapered_corners):
        sign = 1.0 if expand > 0 else -1.0
        m = sign * mask.reshape(-1, 1, *mask.shape[-2:]).float()
        for _ in range(abs(expand)):
            p = torch.nn.functional.pad(m, (1, 1, 1, 1), value=-torch.inf)
            shifts = [p[..., 1 + dy:p.shape[-2] - 1 + dy, 1 + dx:p.shape[-1] - 1 + dx]
                      for dy in (-1, 0, 1) for dx in (-1, 0, 1) if not (tapered_corners and dx and dy)]
            m = torch.stack(shifts).amax(0)
        return ((sign * m)[:, 0],)


class SetLatentNoiseMask:
    """Stand-in for ComfyUI's SetLatentNoiseMask."""

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("LATENT",)
    FUNCTION = "set_mask"
    CATEGORY = "latent/inpaint"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "mask": ("MASK",)}}

    def set_mask(self, samples, mask):
        return ({**samples, "noise_mask": mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1])},)


class SaveImage:
    saved: list[torch.Tensor] = []
    RETURN_TYPES = ()
    RETURN_NAMES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "image"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}}

    def save(self, images, filename_prefix):
        self.saved.append(images)
        return ()


class PreviewAny:
    """Stand-in for ComfyUI's PreviewAny (shows any value, e.g. the LoRA report, as text)."""

    shown: list[str] = []
    RETURN_TYPES = ()
    RETURN_NAMES = ()
    FUNCTION = "main"
    OUTPUT_NODE = True
    CATEGORY = "utils"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"source": ("*", {})}}

    def main(self, source):
        self.shown.append(str(source))
        return ()


def classes() -> dict[str, type]:
    return {**load_pack().NODE_CLASS_MAPPINGS, "LoadImage": LoadImage, "SaveImage": SaveImage,
            "PreviewAny": PreviewAny, "GrowMask": GrowMask, "SetLatentNoiseMask": SetLatentNoiseMask}


def object_info() -> dict:
    """What ComfyUI's /object_info says about each node (the fields a converter needs)."""
    names = load_pack().NODE_DISPLAY_NAME_MAPPINGS
    info = {}
    for name, cls in classes().items():
        spec = cls.INPUT_TYPES()
        info[name] = {
            "input": spec, "input_order": {k: list(v) for k, v in spec.items()},
            "output": list(cls.RETURN_TYPES), "output_name": list(cls.RETURN_NAMES),
            "name": name, "display_name": names.get(name, name), "category": cls.CATEGORY,
            "output_node": getattr(cls, "OUTPUT_NODE", False), "description": getattr(cls, "DESCRIPTION", ""),
        }
    return info


def is_widget(spec) -> bool:
    options = spec[1] if len(spec) > 1 else {}
    return (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES) and not options.get("forceInput")


def has_control_slot(name: str, spec) -> bool:
    options = spec[1] if len(spec) > 1 else {}
    return spec[0] == "INT" and options.get("control_after_generate", name in ("seed", "noise_seed"))


def ui_to_api(workflow: dict, info: dict) -> dict:
    """Convert a UI-format workflow: widgets_values map onto the widget inputs in declaration order."""
    links = {link[0]: link for link in workflow["links"]}
    api = {}
    for node in workflow["nodes"]:
        if node["type"] in UI_ONLY or node.get("mode", 0) in (2, 4):
            continue
        spec = info[node["type"]]["input"]
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values, pos, inputs = list(node.get("widgets_values") or []), 0, {}
        for section in ("required", "optional"):
            for name, s in spec.get(section, {}).items():
                if is_widget(s):
                    inputs[name] = values[pos]
                    pos += 1
                    if has_control_slot(name, s):
                        assert values[pos] in CONTROL_VALUES, f"node {node['id']}: {values[pos]!r} after {name}"
                        pos += 1
                if name in linked:
                    inputs[name] = [str(linked[name][1]), linked[name][2]]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def check_value(kind, value) -> None:
    """Does ``value`` look like what an output of type ``kind`` must carry?"""
    enc = submodule("encode")
    from firered_core.geometry import PadRecord
    from firered_core.model import FireRedModel
    from firered_core.speed import SpeedSettings

    expected = {"FIRERED_MODEL": FireRedModel, "FIRERED_REFS": enc.References, "FIRERED_COND": enc.Conditioning,
                "FIRERED_CROP": PadRecord, "FIRERED_SPEED": SpeedSettings, "INT": int, "FLOAT": float, "STRING": str}
    if kind == "IMAGE":
        assert isinstance(value, torch.Tensor) and value.ndim == 4 and value.shape[-1] == 3, value.shape
        assert value.dtype == torch.float32 and value.device.type == "cpu"
        assert float(value.min()) >= 0.0 and float(value.max()) <= 1.0
    elif kind == "MASK":
        assert isinstance(value, torch.Tensor) and value.ndim == 3
    elif kind == "LATENT":
        s = value["samples"]
        assert isinstance(s, torch.Tensor) and s.ndim == 5 and s.shape[1] == 16 and s.shape[2] == 1, s.shape
        assert s.dtype == torch.float32 and s.device.type == "cpu"
    else:
        assert isinstance(value, expected[kind]), (kind, type(value))


class PromptInvalid(AssertionError):
    """ComfyUI would refuse the prompt before running it (the message is what its error dialog shows)."""


def validate_inputs(cls, inputs: dict) -> None:
    """ComfyUI's prompt validation of widget values: combos in their list, numbers within min/max; inputs a
    ``VALIDATE_INPUTS`` names skip those checks and go to it instead (True, or the message ComfyUI shows)."""
    import inspect

    spec = cls.INPUT_TYPES()
    custom = getattr(cls, "VALIDATE_INPUTS", None)
    own = inspect.getfullargspec(custom).args if custom else []
    for name in spec.get("required", {}):
        assert name in inputs, f"{cls.__name__}: required input {name} missing"
    if custom:
        verdict = custom(**{k: v for k, v in inputs.items() if k in own and not isinstance(v, list)})
        if verdict is not True:
            raise PromptInvalid(f"{cls.__name__}: {verdict}")
    for section in ("required", "optional"):
        for name, s in spec.get(section, {}).items():
            if name not in inputs or name in own or isinstance(inputs[name], list) and not isinstance(s[0], list):
                continue
            value, options = inputs[name], (s[1] if len(s) > 1 else {})
            if isinstance(s[0], list):
                assert value in s[0], f"{cls.__name__}.{name}: {value!r} not in {s[0]}"
            elif s[0] in ("INT", "FLOAT"):
                assert options.get("min", -np.inf) <= value <= options.get("max", np.inf), (cls.__name__, name)


LORA_TARGETS = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0",
                "transformer_blocks.1.img_mlp.net.2", "transformer_blocks.1.txt_mod.1")


def write_lora(model_dir: Path, path: Path, seed: int = 0, style: str = "comfy", rename: bool = False) -> Path:
    """A rank-4 LoRA for the tiny model's transformer (saved with ``firered_core.lora.save_lora``); ``rename``
    renames one key (``attn.to_q`` -> ``attn.to_query``) to one no layer has."""
    from safetensors.torch import load_file, save_file

    from firered_core.lora import LoraWeights, linear_modules, save_lora
    from firered_core.model import load_model

    linears = linear_modules(load_model(model_dir).transformer)
    gen = torch.Generator().manual_seed(seed)
    weights = {m: LoraWeights(torch.randn(4, linears[m].in_features, generator=gen) * 0.5,
                              torch.randn(linears[m].out_features, 4, generator=gen) * 0.5, 2.0)
               for m in LORA_TARGETS}
    save_lora(weights, path, style=style)
    if rename:
        tensors = load_file(str(path))
        key = next(k for k in sorted(tensors) if ".attn.to_q." in k)
        tensors[key.replace(".attn.to_q.", ".attn.to_query.")] = tensors.pop(key)
        save_file(tensors, str(path))
    return path


def execute(api: dict) -> dict:
    """Run an API prompt as ComfyUI does: from each output node, dependencies first, each node once."""
    registry, results = classes(), {}

    def run(node_id: str):
        if node_id not in results:
            node = api[node_id]
            cls = registry[node["class_type"]]
            kwargs = {k: run(v[0])[v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
            validate_inputs(cls, node["inputs"])
            out = getattr(cls(), cls.FUNCTION)(**kwargs)
            assert isinstance(out, tuple) and len(out) == len(cls.RETURN_TYPES), cls.__name__
            for kind, value in zip(cls.RETURN_TYPES, out):
                check_value(kind, value)
            results[node_id] = out
        return results[node_id]

    for node_id, node in api.items():
        if getattr(registry[node["class_type"]], "OUTPUT_NODE", False):
            run(node_id)
    return results
