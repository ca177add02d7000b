"""LoRA key styles: splitting a key into (module, part, style), finding the module, writing keys back.

Key styles read (the module path is what remains after the prefix, matched against the transformer's Linear modules):

- diffusers / peft: ``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` (optional ``.alpha``)
- PEFT adapter saves: ``base_model.model.<module>.lora_A[.<adapter>].weight`` + ``adapter_config.json`` (lora_alpha, r,
  alpha_pattern, use_rslora) next to the file
- ComfyUI: ``diffusion_model.<module>.lora_A/B.weight`` or ``lora_down/up.weight`` + ``.alpha``
- kohya / musubi-tuner: ``lora_unet_<module_with_underscores>.lora_down/up.weight`` + ``.alpha`` (names mapped back
  by matching the model's module list, so ``to_out_0`` finds ``to_out.0``)
- bare ``<module>.lora_A.weight`` (DiffSynth-Studio and others)
- LyCORIS LoKr (``lokr_w1[_a/_b]``, ``lokr_w2[_a/_b]``) and LoHa (``hada_w1_a`` ...); Tucker variants, DoRA and
  full-weight ``diff`` keys are refused by name.

:func:`group_by_module` is the one loop that turns a state dict into per-module parts; planning
(:func:`~firered_core.lora.apply.plan_lora`) and reading plain LoRAs
(:func:`~firered_core.lora.files.lora_weights_from_state_dict`) both use it.
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field

import torch

PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.")
UNDERSCORE_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")
STYLES = ("comfy", "kohya", "diffusers", "peft")
_PART_PATTERNS: list[tuple[re.Pattern, str]] = [
    (re.compile(r"\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight$"), "lora_{0}"),
    (re.compile(r"\.lora_(down|up)\.weight$"), "lora_{0}"),
    (re.compile(r"\.lora\.(down|up)\.weight$"), "lora_{0}"),
    (re.compile(r"\.(alpha)$"), "alpha"),
    (re.compile(r"\.(hada_w[12]_[ab]|hada_t[12])$"), "{0}"),
    (re.compile(r"\.(lokr_w[12](?:_[ab])?|lokr_t2)$"), "{0}"),
    (re.compile(r"\.(dora_scale|lora_mid\.weight|diff|diff_b|lora_B\.bias|lora_up\.bias)$"), "unsupported:{0}"),
]
_PART_ALIASES = {"lora_A": "down", "lora_down": "down", "lora_B": "up", "lora_up": "up"}
_PREFIX_STYLE = {"base_model.model.": "peft", "transformer.": "diffusers"}


def underscore_index(names: Iterable[str]) -> dict[str, str]:
    """kohya-style ``a_b_0_c`` -> real ``a_b.0.c`` for every name whose underscored form is unambiguous."""
    index: dict[str, str | None] = {}
    for name in names:
        flat = name.replace(".", "_")
        index[flat] = None if flat in index else name
    return {k: v for k, v in index.items() if v is not None}


def resolve_module(raw: str, style: str, names: Container[str], underscored: Mapping[str, str]) -> str | None:
    """The model's module name for a key's module path (kohya names through ``underscored``), or None."""
    if raw in names:
        return raw
    if style == "kohya" or "." not in raw:
        return underscored.get(raw.replace(".", "_"))
    return None


def split_key(key: str) -> tuple[str, str, str] | None:
    """``(module path as written, part, style)`` of one LoRA key, or None when the suffix is not a LoRA part."""
    for pattern, part in _PART_PATTERNS:
        m = pattern.search(key)
        if m:
            raw = key[: m.start()]
            part = part.format(m.group(1))
            part = _PART_ALIASES.get(part, part)
            style = "bare"
            for prefix in UNDERSCORE_PREFIXES:
                if raw.startswith(prefix):
                    return raw[len(prefix):], part, "kohya"
            stripped = True
            while stripped:
                stripped = False
                for prefix in PREFIXES:
                    if raw.startswith(prefix):
                        raw, style, stripped = raw[len(prefix):], _PREFIX_STYLE.get(prefix, "comfy"), True
            if ".lora_A." in key and re.search(r"\.lora_[AB]\.[^.]+\.weight$", key):
                style = "peft"
            return raw, part, style
    return None


@dataclass
class Grouped:
    """A state dict sorted by module: ``parts[module][part]``, the keys behind each module, the styles seen, and
    every key that found no module (with why)."""

    parts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    keys_of: dict[str, list[str]] = field(default_factory=dict)
    styles: set[str] = field(default_factory=set)
    unmatched: dict[str, str] = field(default_factory=dict)


def group_by_module(state: Mapping[str, torch.Tensor], names: Iterable[str]) -> Grouped:
    """Split every key of ``state`` and match it to one of ``names`` (the model's Linear modules)."""
    names = names if isinstance(names, (set, frozenset, dict)) else set(names)
    underscored = underscore_index(names)
    out = Grouped()
    for key, tensor in state.items():
        split = split_key(key)
        if split is None:
            out.unmatched[key] = "not a LoRA key (unknown suffix)"
            continue
        raw, part, style = split
        if part.startswith("unsupported:"):
            out.unmatched[key] = f"unsupported LoRA part {part.split(':', 1)[1]!r}"
            continue
        module = resolve_module(raw, style, names, underscored)
        if module is None:
            out.unmatched[key] = f"no Linear module {raw!r} in the transformer"
            continue
        out.styles.add(style)
        out.parts.setdefault(module, {})[part] = tensor
        out.keys_of.setdefault(module, []).append(key)
    return out


def lora_keys(module: str, style: str) -> tuple[str, str, str | None]:
    """``(down key, up key, alpha key or None)`` for one module in a key style."""
    if style == "comfy":
        base = f"diffusion_model.{module}"
        return f"{base}.lora_down.weight", f"{base}.lora_up.weight", f"{base}.alpha"
    if style == "kohya":
        base = "lora_unet_" + module.replace(".", "_")
        return f"{base}.lora_down.weight", f"{base}.lora_up.weight", f"{base}.alpha"
    if style == "diffusers":
        return f"transformer.{module}.lora_A.weight", f"transformer.{module}.lora_B.weight", None
    if style == "peft":
        return f"base_model.model.{module}.lora_A.weight", f"base_model.model.{module}.lora_B.weight", None
    raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def module_alpha(module: str, config: Mapping | None) -> float | None:
    """A module's alpha from a PEFT adapter config (``alpha_pattern`` first, then ``lora_alpha``), or None."""
    if not config:
        return None
    value = pattern_value(module, config.get("alpha_pattern"))
    if value is not None:
        return float(value)
    return float(config["lora_alpha"]) if config.get("lora_alpha") is not None else None


def module_rank(module: str, config: Mapping | None) -> int | None:
    """A module's rank as a PEFT adapter config states it (``rank_pattern`` first, then ``r``), or None."""
    if not config:
        return None
    value = pattern_value(module, config.get("rank_pattern"))
    return int(value) if value is not None else (int(config["r"]) if config.get("r") is not None else None)


def pattern_value(module: str, patterns: Mapping | None):
    """PEFT's per-module override: the value of the first pattern naming ``module`` (exact, suffix or regex)."""
    for pattern, value in (patterns or {}).items():
        if module == pattern or module.endswith("." + pattern) or re.fullmatch(pattern, module):
            return value
    return None


def targets_module(module: str, target_modules: str | Iterable[str] | None) -> bool:
    """Whether PEFT's ``target_modules`` (a regex, or names matched as suffixes) includes ``module``."""
    if target_modules is None:
        return True
    if isinstance(target_modules, str):
        return target_modules == "all-linear" or re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)
