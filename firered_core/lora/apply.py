"""Planning and applying LoRAs (merged into the weights or as runtime adapters) with a coverage report, and
removing them exactly.

Every LoRA is planned (matched and its deltas computed) before anything changes, so a refused LoRA leaves the model
as it was. Each LoRA contributes ``strength * scale * delta`` (see :mod:`~firered_core.lora.deltas`). Merging into a
packed GGUF layer is refused by name (it would mean dequantising it for good): use ``mode="adapter"`` or load the GGUF
with ``gguf_mode="load"``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..formats.gguf.linear import GGUFLinear
from ..limits import check
from .adapter import LoraLinear, linear_modules, set_submodule, weight_shape
from .deltas import Delta, module_delta
from .errors import LoraError
from .files import read_lora_file
from .keys import group_by_module, module_alpha, module_rank, split_key, targets_module
from .report import LoraCoverage, LoraReport
from .state import LoraState, lora_state, set_lora_state

log = logging.getLogger(__name__)
MODES = ("merge", "adapter")
MAX_DELTA = 1e4  # no weight of this model family comes near; a larger change is a corrupt or mis-scaled file


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
class PlannedLora:
    """One LoRA matched against the model: its coverage, ``{module: (down, up, scale)}`` and, per module whose keys
    matched but could not be used, why (a rank or shape mismatch)."""

    coverage: LoraCoverage
    deltas: dict[str, Delta]
    problems: dict[str, str] = field(default_factory=dict)


def _check_tensors(name: str, module: str, keys: list[str], state: Mapping[str, torch.Tensor]) -> None:
    """NaN or inf in a LoRA tensor would turn every image black: refuse the file, naming the tensor."""
    for key in keys:
        tensor = state[key]
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise LoraError(f"LoRA {name}: tensor {key} ({module}) holds {bad} NaN/inf value(s) of "
                            f"{tensor.numel()}; the file is corrupt")


def _check_size(name: str, module: str, delta: Delta, strength: float) -> None:
    """A delta far beyond any weight (a corrupt or wrongly scaled file) is refused, naming the module."""
    down, up, scale = delta
    factor = abs(strength * scale)
    bound = float(up.abs().max()) * factor * (float(down.abs().max()) * down.shape[0] if down is not None else 1.0)
    if bound <= MAX_DELTA:
        return
    peak = float((up.float() @ down.float() if down is not None else up.float()).abs().max()) * factor
    if not math.isfinite(peak) or peak > MAX_DELTA:
        raise LoraError(f"LoRA {name}: the change to {module} reaches {peak:.3g} (strength {strength:g} x scale "
                        f"{scale:g}); weights of this model stay far below {MAX_DELTA:g}: the file is corrupt or its "
                        "strength / alpha is wrong")


def plan_lora(state: Mapping[str, torch.Tensor], linears: Mapping[str, nn.Linear], name: str = "<lora>",
              strength: float = 1.0, adapter_config: Mapping | None = None) -> PlannedLora:
    """Match every key of ``state`` to a Linear of the model and compute the per-module deltas (nothing applied).

    Raises :class:`LoraError` for NaN / inf tensors and for deltas beyond :data:`MAX_DELTA`.
    """
    grouped = group_by_module(state, linears)
    coverage = LoraCoverage(name=name, strength=strength, unmatched=grouped.unmatched)
    deltas, problems, assumed = {}, {}, []
    for module, parts in grouped.parts.items():
        _check_tensors(name, module, grouped.keys_of[module], state)
        shape_w = weight_shape(linears[module])
        try:
            down, up, scale = module_delta(parts, module, adapter_config)
            shape = (up.shape[0], down.shape[1]) if down is not None else tuple(up.shape)
            stated = module_rank(module, adapter_config)
            if down is not None and stated is not None and stated != down.shape[0]:
                raise LoraError(f"rank mismatch: the adapter config says rank {stated}, the tensors have rank "
                                f"{down.shape[0]} (lora_A {tuple(down.shape)}, lora_B {tuple(up.shape)})")
            if shape != shape_w:
                if down is None and up.numel() == math.prod(shape_w):
                    up = up.reshape(shape_w)
                else:
                    kind = f"rank {down.shape[0]} pair" if down is not None else "delta"
                    raise LoraError(f"shape mismatch: the {kind} makes a {shape} change "
                                    f"(lora_A {tuple(down.shape) if down is not None else '-'}, lora_B "
                                    f"{tuple(up.shape)}) but the weight is {shape_w}")
        except LoraError as exc:
            problems[module] = str(exc)
            for key in grouped.keys_of[module]:
                coverage.unmatched[key] = f"{module}: {exc}"
            continue
        _check_size(name, module, (down, up, scale), strength)
        if adapter_config and not targets_module(module, adapter_config.get("target_modules")):
            coverage.notes.append(f"{module} is not in the adapter config's target_modules")
        if ("alpha" not in parts and module_alpha(module, adapter_config) is None and down is not None
                and not _alpha_folded(grouped.keys_of[module])):
            assumed.append(module)
        deltas[module] = (down, up, scale)
        coverage.matched += grouped.keys_of[module]
        coverage.modules.append(module)
    if assumed:
        coverage.notes.append(f"alpha unknown for {len(assumed)} module(s) (no alpha keys, no adapter_config.json): "
                              "assumed scale 1.0 (alpha = rank)")
    coverage.styles = sorted(grouped.styles)
    return PlannedLora(coverage, deltas, problems)


def _alpha_folded(keys) -> bool:
    """diffusers-style keys (``transformer.<module>.lora_A.weight``): diffusers saves no alpha because its scale is
    folded into the weights (alpha = rank by that format's definition), so nothing is unknown."""
    return all((split_key(k) or ("", "", ""))[2] == "diffusers" for k in keys)


def _plan_spec(spec: LoraSpec, linears: Mapping[str, nn.Module], allow_partial: bool) -> PlannedLora:
    """Read and plan one LoRA; refuse one that matches nothing, or (unless ``allow_partial``) matches in part."""
    config = spec.adapter_config
    if spec.state_dict is not None:
        state = spec.state_dict
    elif spec.path is not None:
        state, file_config = read_lora_file(spec.path)
        config = config or file_config
    else:
        raise LoraError("a LoraSpec needs a path or a state_dict")
    check({"strength": spec.strength}, spell=lambda _: f"LoRA {spec.label}: strength",
          limits={"strength": "lora_strength"})
    plan = plan_lora(state, linears, spec.label, spec.strength, config)
    cov = plan.coverage
    for note in cov.notes:
        log.warning("LoRA %s: %s", cov.name, note)
    if not cov.matched and plan.problems:
        listed = "; ".join(f"{m}: {why}" for m, why in list(plan.problems.items())[:3])
        raise LoraError(f"LoRA {cov.name} does not fit this transformer: {len(plan.problems)} module(s) "
                        f"refused ({listed}{'; ...' if len(plan.problems) > 3 else ''})")
    if not cov.matched:
        from ..formats.identify import identify

        raise LoraError(f"LoRA {cov.name}: none of its {len(state)} keys "
                        f"matches this transformer (the file looks like {identify(list(state))}; first keys: "
                        f"{', '.join(list(cov.unmatched)[:3])})")
    if cov.unmatched and not allow_partial:
        listed = "\n".join(f"  {k}: {why}" for k, why in list(cov.unmatched.items())[:30])
        more = f"\n  ... and {len(cov.unmatched) - 30} more" if len(cov.unmatched) > 30 else ""
        raise LoraError(f"LoRA {cov.name} would apply only in part: {len(cov.matched)} keys matched, "
                        f"{len(cov.unmatched)} unmatched (allow_partial=True or --allow-partial-lora to apply "
                        f"anyway):\n{listed}{more}")
    return plan


def apply_loras(transformer: nn.Module, specs: Sequence[LoraSpec | str | Path], mode: str = "merge",
                allow_partial: bool = False) -> LoraReport:
    """Apply several LoRAs, each with its strength, merged into the weights or as runtime adapters.

    Every file is matched before anything changes: if one LoRA matches no key, or (unless ``allow_partial``) leaves
    any key unmatched, :class:`LoraError` names the file and the keys and the model is left as it was. Merging keeps
    the original weight tensors (the touched layers take twice their memory while merged) so :func:`remove_loras`
    restores them bit-exactly.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be 'merge' or 'adapter', got {mode!r}")
    _refuse_fp8_file(transformer)
    linears = linear_modules(transformer)
    plans = [_plan_spec(s if isinstance(s, LoraSpec) else LoraSpec(path=s), linears, allow_partial) for s in specs]
    if mode == "merge":
        _refuse_packed_merge(linears, plans)
    state = lora_state(transformer, create=True)
    with torch.no_grad():
        if mode == "merge":
            _merge(linears, plans, state)
        else:
            _attach(transformer, plans, state)
    report = LoraReport(mode=mode, loras=[p.coverage for p in plans])
    state.applied += [(p.coverage.name, p.coverage.strength, mode) for p in plans]
    for cov in report.loras:
        (log.warning if cov.unmatched else log.info)("%s", cov.line())
    return report


def _refuse_fp8_file(transformer: nn.Module) -> None:
    """Layers that keep an fp8 file's weights in fp8 (``fp8_mode="runtime"``) take no LoRA: say how to load it."""
    from ..quant.linear import FastQuantLinear

    kept = [name for name, m in transformer.named_modules() if isinstance(m, FastQuantLinear) and m.from_file]
    if kept:
        raise LoraError(f"the transformer keeps {len(kept)} Linear weights of its fp8 file in fp8 (fp8_mode="
                        f"'runtime', e.g. {kept[0]}); LoRAs go onto full-precision weights: load the model with "
                        "fp8_mode='load' (--fp8-mode load, or fp8_mode load in FireRed Speed Settings) to apply "
                        "LoRAs", field="fp8_mode")


def _refuse_packed_merge(linears: Mapping[str, nn.Module], plans: list[PlannedLora]) -> None:
    """Merging into a packed GGUF layer would dequantise it for good: refuse, naming the layers and the way out."""
    for plan in plans:
        packed = [m for m in plan.deltas if isinstance(linears[m], GGUFLinear)]
        if packed:
            kinds = sorted({linears[m].qtype_name for m in packed})
            raise LoraError(f"LoRA {plan.coverage.name}: cannot merge into {len(packed)} GGUF-quantised layers "
                            f"({'/'.join(kinds)}, e.g. {', '.join(packed[:3])}) without dequantising them; apply it "
                            "with mode='adapter' (--lora-mode adapter) or load the GGUF with gguf_mode='load'")


def _merge(linears: Mapping[str, nn.Linear], plans: list[PlannedLora], state: LoraState) -> None:
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
        if module not in state.originals:
            state.originals[module] = (linear, linear.weight)
        merged = (linear.weight.to(torch.float32) + delta).to(linear.weight.dtype)
        linear.weight = nn.Parameter(merged, requires_grad=False)


def _attach(model: nn.Module, plans: list[PlannedLora], state: LoraState) -> None:
    for plan in plans:
        strength = plan.coverage.strength
        for module, (down, up, scale) in plan.deltas.items():
            current = model.get_submodule(module)
            if not isinstance(current, LoraLinear):
                wrapper = LoraLinear(current)
                set_submodule(model, module, wrapper)
                state.wrapped[module] = current
                current = wrapper
            current.add(strength * scale, down, up)


def remove_loras(transformer: nn.Module) -> int:
    """Undo every :func:`apply_loras`: put back the original Linear objects and weight tensors (bit-exact).

    Returns how many modules were restored.
    """
    state = lora_state(transformer)
    if state is None:
        return 0
    for name, base in state.wrapped.items():
        set_submodule(transformer, name, base)
    for linear, weight in state.originals.values():
        linear.weight = weight
    restored = len(set(state.wrapped) | set(state.originals))
    set_lora_state(transformer, None)
    return restored


def applied_loras(transformer: nn.Module) -> list[tuple[str, float, str]]:
    """``(name, strength, mode)`` of the LoRAs currently applied."""
    state = lora_state(transformer)
    return list(state.applied) if state else []


def default_mode(transformer: nn.Module) -> str:
    """``adapter`` when the transformer keeps packed GGUF layers (merging would dequantise them), else ``merge``."""
    return "adapter" if any(isinstance(m, GGUFLinear) for m in transformer.modules()) else "merge"
