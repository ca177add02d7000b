"""Delta algorithms: what one module's parts add to its weight, one function per kind (LoRA, LoHa, LoKr).

Each returns ``(down, up, scale)``: a low-rank pair (``up @ down``) for LoRA, or ``(None, full_delta, scale)`` for
LoHa / LoKr. Scale = ``alpha / rank`` (``alpha / sqrt(rank)`` with PEFT ``use_rslora``), 1.0 without an alpha.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .errors import LoraError
from .keys import module_alpha

Delta = tuple[torch.Tensor | None, torch.Tensor, float]


def lora_delta(parts: Mapping[str, torch.Tensor], alpha: float | None, rslora: bool = False) -> Delta:
    """A plain LoRA pair: ``down`` (lora_A) [rank, in], ``up`` (lora_B) [out, rank]."""
    if "down" not in parts or "up" not in parts:
        raise LoraError(f"has {'up (lora_B)' if 'up' in parts else 'down (lora_A)'} without its pair")
    down, up = parts["down"], parts["up"]
    if down.dim() != 2 or up.dim() != 2:
        raise LoraError(f"convolutional LoRA (shapes {tuple(down.shape)}, {tuple(up.shape)}) on a Linear")
    rank = down.shape[0]
    if up.shape[1] != rank:
        raise LoraError(f"rank mismatch: lora_A {tuple(down.shape)}, lora_B {tuple(up.shape)}")
    if alpha is None:
        return down, up, 1.0
    return down, up, alpha / math.sqrt(rank) if rslora else alpha / rank


def loha_delta(parts: Mapping[str, torch.Tensor], alpha: float | None) -> Delta:
    """LoHa: the Hadamard product of two low-rank products, ``(w1_a @ w1_b) * (w2_a @ w2_b)``."""
    if "hada_t1" in parts or "hada_t2" in parts:
        raise LoraError("LoHa with Tucker decomposition (hada_t1/t2) is not supported")
    need = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    if any(k not in parts for k in need):
        raise LoraError(f"incomplete LoHa: has {sorted(parts)}")
    w1 = parts["hada_w1_a"].float() @ parts["hada_w1_b"].float()
    w2 = parts["hada_w2_a"].float() @ parts["hada_w2_b"].float()
    rank = parts["hada_w1_b"].shape[0]
    return None, w1 * w2, (alpha / rank if alpha is not None else 1.0)


def lokr_delta(parts: Mapping[str, torch.Tensor], alpha: float | None) -> Delta:
    """LoKr: the Kronecker product of two factors, each given whole (``lokr_wN``) or as a low-rank pair."""
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


def module_delta(parts: Mapping[str, torch.Tensor], module: str, config: Mapping | None) -> Delta:
    """The delta of one module's parts, by kind; alpha from the file, else from the PEFT adapter ``config``."""
    alpha_t = parts.get("alpha")
    alpha = float(alpha_t.float().reshape(-1)[0]) if alpha_t is not None else module_alpha(module, config)
    if "down" in parts or "up" in parts:
        return lora_delta(parts, alpha, bool(config and config.get("use_rslora")))
    if any(k.startswith("hada_") for k in parts):
        return loha_delta(parts, alpha)
    if any(k.startswith("lokr_") for k in parts):
        return lokr_delta(parts, alpha)
    raise LoraError(f"only {sorted(parts)}: no weights")
