"""Flow-matching loss: x_t = (1 - sigma) x0 + sigma noise, the model predicts v = noise - x0.

Elements whose error exceeds ``outlier`` in magnitude are masked out (FireRed's trainer does this so that a few
corrupt latents cannot blow up a step). Each row's loss is the mean over its kept elements, times a weight that
depends on sigma; the batch loss is the mean over rows, so per-rank means average to the global mean under DDP.
"""

from __future__ import annotations

import math

import torch

WEIGHTINGS = ("none", "sigma_sqrt", "cosmap", "logit_normal")
OUTLIER = 50.0


def loss_weight(sigma: torch.Tensor, scheme: str = "none") -> torch.Tensor:
    """Per-row weight: ``sigma_sqrt`` = sigma^-2 (SD3), ``cosmap`` and ``logit_normal`` densities (SD3 paper)."""
    if scheme == "none":
        return torch.ones_like(sigma)
    if scheme == "sigma_sqrt":
        return (sigma ** -2.0).clamp(max=100.0)
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigma + 2.0 * sigma ** 2))
    if scheme == "logit_normal":
        s = sigma.clamp(1e-5, 1 - 1e-5)
        logit = torch.log(s / (1 - s))
        return torch.exp(-0.5 * logit ** 2) / (math.sqrt(2 * math.pi) * s * (1 - s))
    raise ValueError(f"loss weighting {scheme!r} is not one of {WEIGHTINGS}")


def row_errors(pred: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor, outlier: float | None = OUTLIER
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row masked MSE between ``pred`` and ``noise - x0`` (with gradients) and the keep mask."""
    diff = pred.float() - (noise.float() - x0.float())
    dims = tuple(range(1, diff.dim()))
    keep = torch.ones_like(diff) if outlier is None else (diff.abs() <= outlier).to(diff.dtype)
    return (diff.square() * keep).sum(dims) / keep.sum(dims).clamp(min=1.0), keep


def flow_matching_loss(pred: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor,
                       weighting: str = "none", outlier: float | None = OUTLIER
                       ) -> tuple[torch.Tensor, dict]:
    """Mean weighted masked MSE between ``pred`` and ``noise - x0``; returns (loss, stats)."""
    loss, per_row, keep = weighted_flow_loss(pred, noise, x0, sigma, weighting, outlier)
    stats = {"masked_fraction": float(1.0 - keep.mean()), "per_row": per_row.detach()}
    return loss, stats


def weighted_flow_loss(pred: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor,
                       weighting: str = "none", outlier: float | None = OUTLIER
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of :func:`flow_matching_loss` with the per-row errors and the keep mask, all tensors (nothing read
    back to the host, so it also runs on fake tensors)."""
    per_row, keep = row_errors(pred, noise, x0, outlier)
    return (per_row * loss_weight(sigma.float().to(per_row.device), weighting)).mean(), per_row, keep
