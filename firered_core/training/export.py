"""Exports: a LoRA in ComfyUI-loadable and diffusers key styles, a full fine-tune in the Hugging Face layout.

Trained LoRA tensors come from peft named ``<module>.lora_A.default.weight`` / ``lora_B``. ComfyUI style is
``diffusion_model.<module>.lora_A.weight`` / ``lora_B.weight`` plus ``diffusion_model.<module>.alpha``; diffusers
style is ``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` (scale = alpha / rank, recorded in metadata,
and alpha tensors are omitted because diffusers mis-reads ``transformer.`` + ``.alpha``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

_PEFT = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def lora_modules(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {"A": down, "B": up}}`` from peft-named tensors."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        m = _PEFT.match(name)
        if m is None:
            raise ValueError(f"{name!r} is not a LoRA tensor name")
        out.setdefault(m.group("module"), {})[m.group("ab")] = t.detach().float().cpu().contiguous()
    incomplete = [k for k, v in out.items() if set(v) != {"A", "B"}]
    if incomplete:
        raise ValueError(f"LoRA modules without both A and B: {incomplete[:3]}")
    return out


def comfy_state(modules: dict, alpha: float) -> dict[str, torch.Tensor]:
    sd = {}
    for m, ab in modules.items():
        sd[f"diffusion_model.{m}.lora_A.weight"] = ab["A"]
        sd[f"diffusion_model.{m}.lora_B.weight"] = ab["B"]
        sd[f"diffusion_model.{m}.alpha"] = torch.tensor(float(alpha))
    return sd


def diffusers_state(modules: dict) -> dict[str, torch.Tensor]:
    sd = {}
    for m, ab in modules.items():
        sd[f"transformer.{m}.lora_A.weight"] = ab["A"]
        sd[f"transformer.{m}.lora_B.weight"] = ab["B"]
    return sd


def _atomic_save(tensors: dict, path: Path, metadata: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def export_lora(state: dict[str, torch.Tensor], folder: Path, name: str, alpha: float) -> dict[str, Path]:
    """Write ``<name>_comfy.safetensors`` and ``<name>_diffusers.safetensors``; return their paths."""
    modules = lora_modules(state)
    rank = next(iter(modules.values()))["A"].shape[0]
    meta = {"format": "firered-lora", "rank": str(rank), "alpha": str(float(alpha)),
            "scale": str(float(alpha) / rank), "modules": str(len(modules))}
    return {
        "comfy": _atomic_save(comfy_state(modules, alpha), folder / f"{name}_comfy.safetensors", meta),
        "diffusers": _atomic_save(diffusers_state(modules), folder / f"{name}_diffusers.safetensors", meta),
    }


def export_full(module, trained: dict[str, torch.Tensor], base_model: str | Path, folder: Path) -> Path:
    """The fine-tuned transformer (``save_pretrained``) beside links to (or copies of) the base model's other parts."""
    base = Path(base_model)
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with torch.no_grad():
        saved = {n: p.detach().clone() for n, p in module.named_parameters() if n in trained}
        for n, p in module.named_parameters():
            if n in trained:
                p.copy_(trained[n].to(p.dtype))
        module.save_pretrained(tmp / "transformer", safe_serialization=True)
        for n, p in module.named_parameters():
            if n in saved:
                p.copy_(saved[n])
    for part in base.iterdir():
        if part.name in ("transformer",) or part.name.startswith("."):
            continue
        target = tmp / part.name
        if part.is_dir():
            shutil.copytree(part, target, copy_function=_link_or_copy)
        else:
            _link_or_copy(part, target)
    (tmp / "firered_finetune.json").write_text(json.dumps({"base_model": str(base), "tensors": len(trained)}))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
