"""Exports: a LoRA in ComfyUI-loadable and diffusers key styles, a full fine-tune in the Hugging Face layout.

Key styles are :mod:`firered_core.lora`'s (``save_lora``): ComfyUI ``diffusion_model.<module>.lora_down/up.weight``
+ ``.alpha``; diffusers ``transformer.<module>.lora_A/B.weight`` with alpha / rank folded into ``lora_B``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..lora import LoraWeights, lora_weights_from_state_dict, save_lora, split_key


def lora_weights(state: dict[str, torch.Tensor], alpha: float) -> dict[str, LoraWeights]:
    """``{module: LoraWeights}`` from the peft-named trained tensors (read by :mod:`firered_core.lora`)."""
    modules = {split_key(k)[0] for k in state if split_key(k) is not None}
    weights = lora_weights_from_state_dict({k: v.detach().float().cpu() for k, v in state.items()}, modules)
    return {m: LoraWeights(w.down.contiguous(), w.up.contiguous(), float(alpha)) for m, w in weights.items()}


def export_lora(state: dict[str, torch.Tensor], folder: Path, name: str, alpha: float,
                metadata: dict[str, str] | None = None) -> dict[str, Path]:
    """Write ``<name>_comfy.safetensors`` and ``<name>_diffusers.safetensors``; return their paths. ``metadata``
    goes into both (a distilled LoRA's sampling schedule, :mod:`firered_core.lora.schedule`)."""
    weights = lora_weights(state, alpha)
    rank = next(iter(weights.values())).rank
    meta = {"trainer": "firered_core.training", "rank": str(rank), "alpha": str(float(alpha)),
            "modules": str(len(weights)), **(metadata or {})}
    out = {}
    for style in ("comfy", "diffusers"):
        final = Path(folder) / f"{name}_{style}.safetensors"
        tmp = save_lora(weights, final.with_name(f".{final.name}.tmp"), style=style, metadata=meta)
        os.replace(tmp, final)
        out[style] = final
    return out


def export_full(module, trained: dict[str, torch.Tensor], base_model: str | Path, folder: Path,
                whole: dict[str, torch.Tensor] | None = None) -> Path:
    """The fine-tuned transformer (``save_pretrained``) beside links to (or copies of) the base model's other parts.

    ``whole`` is the complete gathered state dict for FSDP, where ``module`` holds only this rank's shards: the
    transformer is then rebuilt from its config (on the meta device) around ``whole`` with ``trained`` on top.
    """
    base = Path(base_model)
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if whole is not None:
        with torch.device("meta"):
            module = type(module).from_config(module.config)
        module.load_state_dict({**whole, **trained}, strict=True, assign=True)
        trained = {}
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
