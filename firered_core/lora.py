"""LoRA / LoKr / LoHa files in every key style people hold, applied with a coverage report, and removed exactly.

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

Layers kept packed by runtime GGUF (:class:`~firered_core.formats.GGUFLinear`) take LoRAs as adapters; merging
into them is refused by name (it would mean dequantising them for good), so use ``mode="adapter"`` or load the GGUF
with ``gguf_mode="load"``.

Scale per module = ``alpha / rank`` (rank read from the tensors; ``alpha / sqrt(rank)`` with PEFT ``use_rslora``), 1.0
when neither the file nor an adapter config gives an alpha. Each LoRA then contributes ``strength * scale * B @ A``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from collections import ChainMap, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FireRedError
from .formats.gguf_linear import GGUFLinear
from .model import FireRedModel

log = logging.getLogger(__name__)

STATE_ATTR = "_firered_lora_state"
PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.")
UNDERSCORE_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")
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


class LoraError(FireRedError):
    """A LoRA file cannot be applied as a whole: nothing matched, a part is unmatched, or it is malformed."""


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


@dataclass
class LoraSpec:
    """One LoRA to apply: a file (``path``) or an in-memory ``state_dict``, with its ``strength`` (may be negative)."""

    path: str | Path | None = None
    strength: float = 1.0
    state_dict: Mapping[str, torch.Tensor] | None = None
    adapter_config: Mapping | None = None
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or (Path(self.path).name if self.path else "<state dict>")

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """``FILE`` or ``FILE:STRENGTH`` (the CLI form; a Windows drive colon is left alone)."""
        m = re.match(r"^(.*?):(-?[0-9]*\.?[0-9]+(?:[eE]-?[0-9]+)?)$", text)
        if m and m.group(1) and not re.fullmatch(r"[A-Za-z]", m.group(1)):
            return cls(path=m.group(1), strength=float(m.group(2)))
        return cls(path=text)


@dataclass
class LoraCoverage:
    """What one LoRA matched: the keys used, the keys not used (each with why), the modules it changes."""

    name: str
    strength: float
    matched: list[str] = field(default_factory=list)
    unmatched: dict[str, str] = field(default_factory=dict)
    modules: list[str] = field(default_factory=list)
    styles: list[str] = field(default_factory=list)

    def line(self) -> str:
        total = len(self.matched) + len(self.unmatched)
        return (f"LoRA {self.name} (strength {self.strength:g}, {'/'.join(self.styles) or '?'} keys): "
                f"{len(self.matched)}/{total} keys matched, {len(self.modules)} modules touched"
                + (f", {len(self.unmatched)} UNMATCHED" if self.unmatched else ""))


@dataclass
class LoraReport:
    """Coverage of every LoRA applied in one call."""

    mode: str
    loras: list[LoraCoverage]

    @property
    def matched(self) -> list[str]:
        return [k for c in self.loras for k in c.matched]

    @property
    def unmatched(self) -> dict[str, str]:
        return {f"{c.name}: {k}": why for c in self.loras for k, why in c.unmatched.items()}

    @property
    def modules(self) -> list[str]:
        return sorted({m for c in self.loras for m in c.modules})

    def summary(self) -> str:
        lines = [c.line() for c in self.loras]
        for c in self.loras:
            lines += [f"  unmatched {k}: {why}" for k, why in list(c.unmatched.items())[:20]]
        return "\n".join(lines)


class LoraLinear(nn.Module):
    """A Linear plus runtime low-rank adapters, as a plain module (no hooks, so torch.compile traces it whole).

    ``base`` is the original Linear object, untouched; removing the adapters puts it back.
    """

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.adapters: list[tuple[float, str, str | None]] = []

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def add(self, scale: float, down: torch.Tensor | None, up: torch.Tensor) -> None:
        """``up @ down`` (or a full delta ``up`` when ``down`` is None), times ``scale``."""
        i = len(self.adapters)
        device, dtype = _device_dtype(self.base)
        self.register_buffer(f"up_{i}", up.to(device, dtype), persistent=False)
        if down is not None:
            self.register_buffer(f"down_{i}", down.to(device, dtype), persistent=False)
        self.adapters.append((float(scale), f"up_{i}", f"down_{i}" if down is not None else None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for scale, up, down in self.adapters:
            h = F.linear(x, getattr(self, down)) if down is not None else x
            y = y + scale * F.linear(h, getattr(self, up))
        return y


def _device_dtype(linear: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype a layer computes (without decoding a packed GGUF weight)."""
    if isinstance(linear, GGUFLinear):
        return linear.qweight.device, linear.compute_dtype
    return linear.weight.device, linear.weight.dtype


def _weight_shape(linear: nn.Module) -> tuple[int, ...]:
    return linear.weight_shape if isinstance(linear, GGUFLinear) else tuple(linear.weight.shape)


def linear_modules(model: nn.Module) -> dict[str, nn.Linear | GGUFLinear]:
    """``{name: Linear}`` of the model (GGUFLinear included), seeing through :class:`LoraLinear` wrappers (named as
    the wrapped layer)."""
    out: dict[str, nn.Linear | GGUFLinear] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            out[name] = module.base
        elif isinstance(module, (nn.Linear, GGUFLinear)):
            parent, _, child = name.rpartition(".")
            if child == "base" and isinstance(model.get_submodule(parent), LoraLinear):
                continue
            out[name] = module
    return out


def underscore_index(names: Iterable[str]) -> dict[str, str]:
    """kohya-style ``a_b_0_c`` -> real ``a_b.0.c`` for every name whose underscored form is unambiguous."""
    index: dict[str, str | None] = {}
    for name in names:
        flat = name.replace(".", "_")
        index[flat] = None if flat in index else name
    return {k: v for k, v in index.items() if v is not None}


def resolve_module(raw: str, style: str, names: Mapping[str, object], underscored: Mapping[str, str]) -> str | None:
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
                        raw, style, stripped = raw[len(prefix):], {"base_model.model.": "peft",
                                                                    "transformer.": "diffusers"}.get(prefix, "comfy"), True
            if ".lora_A." in key and re.search(r"\.lora_[AB]\.[^.]+\.weight$", key):
                style = "peft"
            return raw, part, style
    return None


def _module_alpha(module: str, config: Mapping | None) -> float | None:
    if not config:
        return None
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern) or re.fullmatch(pattern, module):
            return float(value)
    return float(config["lora_alpha"]) if "lora_alpha" in config else None


def _delta(parts: dict[str, torch.Tensor], module: str, config: Mapping | None) -> tuple[torch.Tensor | None,
                                                                                           torch.Tensor, float]:
    """``(down, up, scale)`` for a LoRA pair, or ``(None, full_delta, scale)`` for LoKr / LoHa."""
    alpha_t = parts.get("alpha")
    alpha = float(alpha_t.float().reshape(-1)[0]) if alpha_t is not None else _module_alpha(module, config)
    if "down" in parts or "up" in parts:
        if "down" not in parts or "up" not in parts:
            raise LoraError(f"has {'up (lora_B)' if 'up' in parts else 'down (lora_A)'} without its pair")
        down, up = parts["down"], parts["up"]
        if down.dim() != 2 or up.dim() != 2:
            raise LoraError(f"convolutional LoRA (shapes {tuple(down.shape)}, {tuple(up.shape)}) on a Linear")
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise LoraError(f"rank mismatch: lora_A {tuple(down.shape)}, lora_B {tuple(up.shape)}")
        if alpha is None:
            scale = 1.0
        elif config and config.get("use_rslora"):
            scale = alpha / math.sqrt(rank)
        else:
            scale = alpha / rank
        return down, up, scale
    if any(k.startswith("hada_") for k in parts):
        if "hada_t1" in parts or "hada_t2" in parts:
            raise LoraError("LoHa with Tucker decomposition (hada_t1/t2) is not supported")
        need = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        if any(k not in parts for k in need):
            raise LoraError(f"incomplete LoHa: has {sorted(parts)}")
        w1 = parts["hada_w1_a"].float() @ parts["hada_w1_b"].float()
        w2 = parts["hada_w2_a"].float() @ parts["hada_w2_b"].float()
        rank = parts["hada_w1_b"].shape[0]
        return None, w1 * w2, (alpha / rank if alpha is not None else 1.0)
    if any(k.startswith("lokr_") for k in parts):
        if "lokr_t2" in parts:
            raise LoraError("LoKr with Tucker decomposition (lokr_t2) is not supported")
        factors, rank = [], None
        for w in ("lokr_w1", "lokr_w2"):
            if w in parts:
                factors.append(parts[w].float())
            elif f"{w}_a" in parts and f"{w}_b" in parts:
                factors.append(parts[f"{w}_a"].float() @ parts[f"{w}_b"].float())
                rank = parts[f"{w}_b"].shape[0]
            else:
                raise LoraError(f"incomplete LoKr: has {sorted(parts)}")
        scale = alpha / rank if (alpha is not None and rank is not None) else 1.0
        return None, torch.kron(factors[0], factors[1]), scale
    raise LoraError(f"only {sorted(parts)}: no weights")


@dataclass
class _Planned:
    coverage: LoraCoverage
    deltas: dict[str, tuple[torch.Tensor | None, torch.Tensor, float]]


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The tensors of a LoRA file (safetensors, or a weights-only torch file) and the PEFT adapter_config.json next
    to it, if any. Never unpickles."""
    from .formats import open_checkpoint

    path = Path(path)
    with open_checkpoint(path) as ckpt:
        if ckpt.kind == "gguf":
            raise LoraError(f"{path}: a GGUF file is not a LoRA")
        state = {k: ckpt[k] for k in ckpt}
    config = None
    cfg_file = path.parent / "adapter_config.json"
    if cfg_file.is_file():
        config = json.loads(cfg_file.read_text())
        if config.get("use_dora"):
            raise LoraError(f"{path}: a DoRA adapter (use_dora in {cfg_file}) is not supported")
    return state, config


def plan_lora(state: Mapping[str, torch.Tensor], linears: Mapping[str, nn.Linear], name: str = "<lora>",
              strength: float = 1.0, adapter_config: Mapping | None = None) -> _Planned:
    """Match every key of ``state`` to a Linear of the model and compute the per-module deltas (nothing applied)."""
    coverage = LoraCoverage(name=name, strength=strength)
    underscored = underscore_index(linears)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    keys_of: dict[str, list[str]] = {}
    styles: set[str] = set()
    for key, tensor in state.items():
        split = split_key(key)
        if split is None:
            coverage.unmatched[key] = "not a LoRA key (unknown suffix)"
            continue
        raw, part, style = split
        if part.startswith("unsupported:"):
            coverage.unmatched[key] = f"unsupported LoRA part {part.split(':', 1)[1]!r}"
            continue
        module = resolve_module(raw, style, linears, underscored)
        if module is None:
            coverage.unmatched[key] = f"no Linear module {raw!r} in the transformer"
            continue
        styles.add(style)
        groups.setdefault(module, {})[part] = tensor
        keys_of.setdefault(module, []).append(key)
    deltas = {}
    for module, parts in groups.items():
        weight_shape = _weight_shape(linears[module])
        try:
            down, up, scale = _delta(parts, module, adapter_config)
            shape = (up.shape[0], down.shape[1]) if down is not None else tuple(up.shape)
            if shape != weight_shape:
                if down is None and up.numel() == math.prod(weight_shape):
                    up = up.reshape(weight_shape)
                else:
                    raise LoraError(f"delta shape {shape} does not fit the weight {weight_shape}")
        except LoraError as exc:
            for key in keys_of[module]:
                coverage.unmatched[key] = f"{module}: {exc}"
            continue
        deltas[module] = (down, up, scale)
        coverage.matched += keys_of[module]
        coverage.modules.append(module)
    coverage.styles = sorted(styles)
    return _Planned(coverage, deltas)


def _state(model: nn.Module) -> dict:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        state = {"originals": {}, "wrapped": {}, "applied": []}
        setattr(model, STATE_ATTR, state)
    return state


def apply_loras(transformer: nn.Module, specs: Sequence[LoraSpec | str | Path], mode: str = "merge",
                allow_partial: bool = False) -> LoraReport:
    """Apply several LoRAs, each with its strength, merged into the weights or as runtime adapters.

    Every file is matched before anything changes: if one LoRA matches no key, or (unless ``allow_partial``) leaves
    any key unmatched, :class:`LoraError` names the file and the keys and the model is left as it was. Merging keeps
    the original weight tensors (the touched layers take twice their memory while merged) so :func:`remove_loras`
    restores them bit-exactly.
    """
    if mode not in ("merge", "adapter"):
        raise ValueError(f"mode must be 'merge' or 'adapter', got {mode!r}")
    linears = linear_modules(transformer)
    plans = []
    for spec in specs:
        spec = spec if isinstance(spec, LoraSpec) else LoraSpec(path=spec)
        config = spec.adapter_config
        if spec.state_dict is not None:
            state = spec.state_dict
        elif spec.path is not None:
            state, file_config = read_lora_file(spec.path)
            config = config or file_config
        else:
            raise ValueError("a LoraSpec needs a path or a state_dict")
        plan = plan_lora(state, linears, spec.label, spec.strength, config)
        cov = plan.coverage
        if not cov.matched:
            from .formats.identify import identify

            raise LoraError(f"LoRA {cov.name}: none of its {len(state)} keys "
                            f"matches this transformer (the file looks like {identify(list(state))}; first keys: "
                            f"{', '.join(list(cov.unmatched)[:3])})")
        if cov.unmatched and not allow_partial:
            listed = "\n".join(f"  {k}: {why}" for k, why in list(cov.unmatched.items())[:30])
            more = f"\n  ... and {len(cov.unmatched) - 30} more" if len(cov.unmatched) > 30 else ""
            raise LoraError(f"LoRA {cov.name} would apply only in part: {len(cov.matched)} keys matched, "
                            f"{len(cov.unmatched)} unmatched (allow_partial=True or --allow-partial-lora to apply "
                            f"anyway):\n{listed}{more}")
        plans.append(plan)
    if mode == "merge":
        _refuse_packed_merge(linears, plans)
    state = _state(transformer)
    with torch.no_grad():
        if mode == "merge":
            _merge(transformer, linears, plans, state)
        else:
            _attach(transformer, linears, plans, state)
    report = LoraReport(mode=mode, loras=[p.coverage for p in plans])
    state["applied"] += [(p.coverage.name, p.coverage.strength, mode) for p in plans]
    for cov in report.loras:
        (log.warning if cov.unmatched else log.info)("%s", cov.line())
    return report


def _refuse_packed_merge(linears: Mapping[str, nn.Module], plans: list[_Planned]) -> None:
    """Merging into a packed GGUF layer would dequantise it for good: refuse, naming the layers and the way out."""
    for plan in plans:
        packed = [m for m in plan.deltas if isinstance(linears[m], GGUFLinear)]
        if packed:
            kinds = sorted({linears[m].qtype_name for m in packed})
            raise LoraError(f"LoRA {plan.coverage.name}: cannot merge into {len(packed)} GGUF-quantised layers "
                            f"({'/'.join(kinds)}, e.g. {', '.join(packed[:3])}) without dequantising them; apply it "
                            "with mode='adapter' (--lora-mode adapter) or load the GGUF with gguf_mode='load'")


def _merge(model: nn.Module, linears: Mapping[str, nn.Linear], plans: list[_Planned], state: dict) -> None:
    total: dict[str, torch.Tensor] = {}
    for plan in plans:
        strength = plan.coverage.strength
        for module, (down, up, scale) in plan.deltas.items():
            w = linears[module].weight
            d = (up.to(w.device, torch.float32) @ down.to(w.device, torch.float32) if down is not None
                 else up.to(w.device, torch.float32))
            d = d * (strength * scale)
            total[module] = total[module] + d if module in total else d
    for module, delta in total.items():
        linear = linears[module]
        if module not in state["originals"]:
            state["originals"][module] = (linear, linear.weight)
        merged = (linear.weight.to(torch.float32) + delta).to(linear.weight.dtype)
        linear.weight = nn.Parameter(merged, requires_grad=False)


def _attach(model: nn.Module, linears: Mapping[str, nn.Linear], plans: list[_Planned], state: dict) -> None:
    for plan in plans:
        strength = plan.coverage.strength
        for module, (down, up, scale) in plan.deltas.items():
            current = model.get_submodule(module)
            if not isinstance(current, LoraLinear):
                wrapper = LoraLinear(current)
                _set_submodule(model, module, wrapper)
                state["wrapped"][module] = current
                current = wrapper
            current.add(strength * scale, down, up)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def remove_loras(transformer: nn.Module) -> int:
    """Undo every :func:`apply_loras`: put back the original Linear objects and weight tensors (bit-exact).

    Returns how many modules were restored.
    """
    state = getattr(transformer, STATE_ATTR, None)
    if not state:
        return 0
    for name, base in state["wrapped"].items():
        _set_submodule(transformer, name, base)
    for linear, weight in state["originals"].values():
        linear.weight = weight
    restored = len(set(state["wrapped"]) | set(state["originals"]))
    setattr(transformer, STATE_ATTR, None)
    return restored


def applied_loras(transformer: nn.Module) -> list[tuple[str, float, str]]:
    """``(name, strength, mode)`` of the LoRAs currently applied."""
    state = getattr(transformer, STATE_ATTR, None)
    return list(state["applied"]) if state else []


STYLES = ("comfy", "kohya", "diffusers", "peft")


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


def save_lora(weights: Mapping[str, LoraWeights], path: str | Path, style: str = "comfy",
              metadata: Mapping[str, str] | None = None) -> Path:
    """Write a LoRA in a key style; returns the weights file written.

    ``peft`` writes a folder (``path``) with ``adapter_model.safetensors`` and ``adapter_config.json`` (r, lora_alpha,
    target_modules, rank_pattern / alpha_pattern when modules differ). The other styles write one ``.safetensors`` file.
    """
    from safetensors.torch import save_file

    if not weights:
        raise ValueError("no LoRA weights to save")
    path = Path(path)
    tensors = lora_state_dict(weights, style)
    meta = {"format": "pt", "firered_lora_style": style, **(metadata or {})}
    if style != "peft":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)
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
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata=meta)
    return path / "adapter_model.safetensors"


def lora_weights_from_state_dict(state: Mapping[str, torch.Tensor], module_names: Iterable[str],
                                 adapter_config: Mapping | None = None) -> dict[str, LoraWeights]:
    """Read any supported key style (e.g. a PEFT model's ``state_dict()``) into ``{module: LoraWeights}``.

    ``module_names`` are the model's Linear names (for kohya names). Alpha comes from the file or ``adapter_config``.
    """
    names = set(module_names)
    underscored = underscore_index(names)
    out: dict[str, LoraWeights] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        split = split_key(key)
        if split is None or split[1] not in ("down", "up", "alpha"):
            raise LoraError(f"{key}: not a plain LoRA key (lora_A/B, lora_down/up, alpha)")
        raw, part, style = split
        module = resolve_module(raw, style, names, underscored)
        if module is None:
            raise LoraError(f"{key}: no module {raw!r}")
        groups.setdefault(module, {})[part] = tensor
    for module, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            raise LoraError(f"{module}: incomplete LoRA pair ({sorted(parts)})")
        alpha = parts.get("alpha")
        alpha_v = float(alpha) if alpha is not None else _module_alpha(module, adapter_config)
        out[module] = LoraWeights(parts["down"], parts["up"], alpha_v)
    return out


def default_mode(transformer: nn.Module) -> str:
    """``adapter`` when the transformer keeps packed GGUF layers (merging would dequantise them), else ``merge``."""
    return "adapter" if any(isinstance(m, GGUFLinear) for m in transformer.modules()) else "merge"


def _refuse_prepared(transformer: nn.Module) -> None:
    """LoRAs go onto plain weights: refuse a transformer already quantised, block-swapped or compiled."""
    from .memory import QuantLinear, is_block_swapped

    done = []
    if any(isinstance(m, QuantLinear) for m in transformer.modules()):
        done.append("quantised")
    if is_block_swapped(transformer):
        done.append("block-swapped")
    if any(getattr(m, "_compiled_call_impl", None) is not None for m in transformer.modules()):
        done.append("compiled")
    if done:
        raise LoraError(f"the transformer is already {' and '.join(done)}; LoRAs must be applied before the speed "
                        "settings (quantise / block swap / compile) prepare it: reload the model and apply the "
                        "LoRAs first")


def _copy_tree(module: nn.Module, memo: dict[int, nn.Module]) -> nn.Module:
    """A new object for every module of the tree, with its own child / parameter / buffer / hook containers, sharing
    every tensor with the original (a few thousand Python objects, no weight memory)."""
    clone = copy.copy(module)
    memo[id(module)] = clone
    for key, value in vars(module).items():
        if type(value) in (dict, OrderedDict, list):
            clone.__dict__[key] = copy.copy(value)
    for name, child in module._modules.items():
        if child is not None:
            clone._modules[name] = memo[id(child)] if id(child) in memo else _copy_tree(child, memo)
    return clone


def _remap_state(state: dict, memo: Mapping[int, nn.Module]) -> dict:
    """The LoRA bookkeeping of a copied tree, pointing at the copy's modules (so removal never touches the source)."""
    return {"originals": {name: (memo[id(linear)], weight) for name, (linear, weight) in state["originals"].items()},
            "wrapped": {name: memo[id(base)] for name, base in state["wrapped"].items()},
            "applied": list(state["applied"])}


def with_loras(transformer: nn.Module, specs: Sequence[LoraSpec | str | Path], mode: str | None = None,
               allow_partial: bool = False) -> tuple[nn.Module, LoraReport]:
    """A copy of ``transformer`` with ``specs`` applied; ``transformer`` itself stays bit-exactly as it was.

    Every module object is copied and every tensor shared, except that merging gives only the touched layers new
    weight tensors (copy-on-write: the touched weights take twice their memory while both models live) and adapters
    add only the LoRA's own tensors. The copy is a new object, not yet prepared, so the model's speed settings
    apply to it on its first ``model.use``. LoRAs already applied to ``transformer`` carry over, so calls
    chain (and :func:`remove_loras` on the copy restores its source's base weights). ``mode`` None:
    :func:`default_mode`.
    """
    _refuse_prepared(transformer)
    memo: dict[int, nn.Module] = {}
    clone = _copy_tree(transformer, memo)
    state = getattr(transformer, STATE_ATTR, None)
    if state:
        setattr(clone, STATE_ATTR, _remap_state(state, memo))
    report = apply_loras(clone, specs, mode or default_mode(transformer), allow_partial)
    return clone, report


class LoraModelView(FireRedModel):
    """A :class:`FireRedModel` whose transformer is ``base``'s with extra LoRAs (:func:`with_loras`), sharing every
    other component with ``base`` (loaded lazily by ``base``, so nothing is loaded twice).

    The patched transformer is built lazily as well, and again after :meth:`unload`; build it at once with
    ``view.transformer`` to surface a LoRA error early. :attr:`report` is the coverage of the last build.
    """

    def __init__(self, base: FireRedModel, specs: Sequence[LoraSpec], mode: str | None = None,
                 allow_partial: bool = False):
        super().__init__(root=base.root, sources=dict(base.sources), dtype=base.dtype, device=base.device,
                         offload=base.offload, gguf_mode=base.gguf_mode, settings=base.settings,
                         placement=base.placement)
        self.base = base
        self.specs = list(specs)
        self.mode = mode
        self.allow_partial = allow_partial
        self.report: LoraReport | None = None
        self._own: dict = {}
        self._loaded = ChainMap(self._own, base._loaded)

    def get(self, name: str):
        if name != "transformer":
            return self._own[name] if name in self._own else self.base.get(name)
        with self._lock:
            if name not in self._own:
                self._own[name], self.report = with_loras(self.base.get(name), self.specs, self.mode,
                                                          self.allow_partial)
            return self._own[name]

    def unload(self) -> None:
        """Drop the patched transformer and ``base``'s components (both rebuilt on next use)."""
        with self._lock:
            self._own.clear()
        self.base.unload()


def model_with_loras(model: FireRedModel, specs: Sequence[LoraSpec | str | Path], mode: str | None = None,
                     allow_partial: bool = False) -> tuple[LoraModelView, LoraReport]:
    """A view of ``model`` with ``specs`` applied to its transformer (built now, so errors surface here); ``model``
    is left untouched and keeps serving its own users."""
    view = LoraModelView(model, [s if isinstance(s, LoraSpec) else LoraSpec(path=s) for s in specs], mode,
                         allow_partial)
    view.get("transformer")
    return view, view.report
