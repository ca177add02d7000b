"""LoRA files: reading any supported file (never unpickling), plain LoRA weights, and writing them in a key style."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field

from .errors import LoraError
from .keys import group_by_module, lora_keys, module_alpha


@dataclass
class LoraWeights:
    """One module's low-rank pair: ``down`` (lora_A) [rank, in], ``up`` (lora_B) [out, rank], optional alpha."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


class AdapterConfig(BaseModel):
    """The keys of a PEFT ``adapter_config.json`` that change what a LoRA adds (others are kept, unchecked)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    r: Annotated[int, Field(ge=1)] | None = None
    lora_alpha: float | None = None
    rank_pattern: dict[str, Annotated[int, Field(ge=1)]] = {}
    alpha_pattern: dict[str, float] = {}
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    use_dora: bool = False


def read_adapter_config(path: Path) -> dict:
    """A PEFT ``adapter_config.json``, its LoRA keys type-checked; :class:`LoraError` names the file and the key."""
    from pydantic import ValidationError

    from ..paths import read_json

    raw = read_json(path, LoraError)
    try:
        config = AdapterConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise LoraError(f"{path}: key {key!r} = {err['input']!r}: {err['msg']}") from None
    if config.use_dora:
        raise LoraError(f"{path}: a DoRA adapter (use_dora) is not supported")
    return {**raw, **config.model_dump(exclude_unset=True)}


def adapter_weights(folder: Path) -> Path:
    """The weights file of a PEFT adapter folder (what ``save_pretrained`` writes)."""
    for name in ADAPTER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise LoraError(f"LoRA folder {folder} has no {ADAPTER_WEIGHTS[0]}: a PEFT adapter folder holds "
                    f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS[0]}")


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The tensors of a LoRA file (safetensors, or a weights-only torch file) or PEFT adapter folder, and the PEFT
    adapter_config.json in / next to it, if any. Never unpickles."""
    from ..formats import open_checkpoint

    path = Path(path)
    file = adapter_weights(path) if path.is_dir() else path
    with open_checkpoint(file) as ckpt:
        if ckpt.kind == "gguf":
            raise LoraError(f"{file}: a GGUF file is not a LoRA")
        state = {k: ckpt[k] for k in ckpt}
    cfg_file = file.parent / ADAPTER_CONFIG
    return state, (read_adapter_config(cfg_file) if cfg_file.is_file() else None)


def lora_weights_from_state_dict(state: Mapping[str, torch.Tensor], module_names: Iterable[str],
                                 adapter_config: Mapping | None = None) -> dict[str, LoraWeights]:
    """Read any supported key style (e.g. a PEFT model's ``state_dict()``) into ``{module: LoraWeights}``.

    ``module_names`` are the model's Linear names (for kohya names). Alpha comes from the file or ``adapter_config``.
    """
    grouped = group_by_module(state, module_names)
    for key, why in grouped.unmatched.items():
        raise LoraError(f"{key}: {why}")
    out: dict[str, LoraWeights] = {}
    for module, parts in grouped.parts.items():
        other = sorted(set(parts) - {"down", "up", "alpha"})
        if other:
            raise LoraError(f"{module}: {other} are not plain LoRA parts (lora_A/B, lora_down/up, alpha)")
        if "down" not in parts or "up" not in parts:
            raise LoraError(f"{module}: incomplete LoRA pair ({sorted(parts)})")
        alpha = parts.get("alpha")
        alpha_v = float(alpha) if alpha is not None else module_alpha(module, adapter_config)
        out[module] = LoraWeights(parts["down"], parts["up"], alpha_v)
    return out


def lora_state_dict(weights: Mapping[str, LoraWeights], style: str) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA in one key style.

    ``comfy`` and ``kohya`` store ``.alpha``. ``diffusers`` has no reliable alpha key, so ``alpha / rank`` is folded
    into ``lora_B`` (exact when alpha == rank). ``peft`` keeps alpha in adapter_config.json (see :func:`save_lora`).
    """
    out: dict[str, torch.Tensor] = {}
    for module, w in weights.items():
        down_key, up_key, alpha_key = lora_keys(module, style)
        up = w.up
        if style == "diffusers" and w.alpha is not None and w.scale != 1.0:
            up = (up.float() * w.scale).to(up.dtype)
        out[down_key] = w.down.contiguous()
        out[up_key] = up.contiguous()
        if alpha_key is not None and w.alpha is not None:
            out[alpha_key] = torch.tensor(float(w.alpha))
    return out


def _write_stable(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors with its header's keys sorted: the same weights and metadata always give the same bytes (the
    library writes metadata in hash order, which changes from process to process)."""
    from safetensors.torch import save

    from ..embed_cache import canonical_safetensors

    path.write_bytes(canonical_safetensors(save(tensors, metadata=dict(metadata))))


def save_lora(weights: Mapping[str, LoraWeights], path: str | Path, style: str = "comfy",
              metadata: Mapping[str, str] | None = None) -> Path:
    """Write a LoRA in a key style; returns the weights file written.

    ``peft`` writes a folder (``path``) with ``adapter_model.safetensors`` and ``adapter_config.json`` (r, lora_alpha,
    target_modules, rank_pattern / alpha_pattern when modules differ). The other styles write one ``.safetensors`` file.
    """
    if not weights:
        raise ValueError("no LoRA weights to save")
    path = Path(path)
    tensors = lora_state_dict(weights, style)
    meta = {"format": "pt", "firered_lora_style": style, **(metadata or {})}
    if style != "peft":
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_stable(tensors, path, meta)
        return path
    path.mkdir(parents=True, exist_ok=True)
    ranks = {m: w.rank for m, w in weights.items()}
    alphas = {m: (w.alpha if w.alpha is not None else w.rank) for m, w in weights.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    config = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": False, "bias": "none",
        "target_modules": sorted({m.rsplit(".", 1)[-1] if not m.rsplit(".", 1)[-1].isdigit() else m for m in weights}),
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha},
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    _write_stable(tensors, path / "adapter_model.safetensors", meta)
    return path / "adapter_model.safetensors"
