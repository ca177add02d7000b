"""Build a module without allocating its weights, then adopt the converted tensors (``assign=True``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import FormatError


def build_with_weights(factory: Callable[[], nn.Module], state: Mapping[str, torch.Tensor], source: Path,
                       what: str, allow_missing: tuple[str, ...] = (),
                       finish: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Instantiate ``factory()`` with parameters on the meta device and load ``state`` into it by assignment.

    Buffers computed at construction (rotary tables) stay real. Missing or unexpected keys, or a shape that differs,
    raise :class:`FormatError` naming the file and the first offending keys. ``allow_missing`` lists keys that may be
    absent (the caller fills them, e.g. a tied ``lm_head``); ``finish(module)`` runs after loading, before the check
    that no parameter is left without weights (e.g. to swap in layers whose weights stay packed).
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        module = factory()
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and k not in allow_missing]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}" for k, v in state.items()
             if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:5])})")
        if wrong:
            parts.append(f"{len(wrong)} with another shape (e.g. {'; '.join(wrong[:3])})")
        raise FormatError(f"{source}: the weights do not fit the {what} read from it: {'; '.join(parts)}")
    module.load_state_dict(dict(state), strict=False, assign=True)
    if finish is not None:
        finish(module)
    leftover = [n for n, p in module.named_parameters() if p.is_meta]
    if leftover:
        raise FormatError(f"{source}: {what} parameters left without weights: {', '.join(leftover[:5])}")
    return module


def sidecar_config(path: Path, class_names: tuple[str, ...]) -> dict | None:
    """A diffusers/transformers ``config.json`` next to a single file (``<stem>.json`` or ``config.json``)."""
    for candidate in (path.with_suffix(".json"), path.parent / "config.json"):
        if candidate.is_file():
            try:
                cfg = json.loads(candidate.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            if not isinstance(cfg, dict):
                continue
            names = {cfg.get("_class_name"), *(cfg.get("architectures") or [])}
            if names & set(class_names):
                return cfg
    return None


def metadata_config(metadata: Mapping[str, str]) -> dict | None:
    """A JSON config some writers (ours included) store in the safetensors metadata under ``config``."""
    raw = metadata.get("config")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return cfg if isinstance(cfg, dict) else None
