"""Training noise levels: a base distribution drawn by stratified inverse-CDF sampling, then the resolution shift.

Row ``i`` of a global batch of ``N`` rows at step ``s`` draws ``u`` in the interval ``((i + s) mod N) / N`` plus a
uniform offset, so each step covers [0, 1) evenly and each rank's interval rotates from step to step. ``u`` is then
mapped through the inverse CDF of the chosen distribution:

- ``uniform``: sigma = u
- ``logit_normal``: sigma = sigmoid(mean + std * Phi^-1(u))
- ``curriculum``: uniform on [lo, 1] where lo falls linearly from ``curriculum_start`` (high noise only) to 0 over
  ``curriculum_steps`` steps, after which it is plain uniform (FireRed report: high noise first).

Finally sigmas are shifted as at inference (exponential time shift with ``mu`` from the output token count, taken
from :func:`firered_core.sampling.compute_mu`), or by a constant shift, or not at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import with_config

from ..sampling import compute_mu
from ..limits import CONFIG, Positive, PositiveInt, Probability
from .seeding import row_generator

KINDS = ("uniform", "logit_normal", "curriculum")
EPS = 1e-5


@with_config(CONFIG)
@dataclass
class TimestepConfig:
    kind: Literal["uniform", "logit_normal", "curriculum"] = "uniform"
    logit_mean: float = 0.0
    logit_std: Positive = 1.0
    curriculum_start: Probability = 0.7
    curriculum_steps: PositiveInt = 1000
    shift: Literal["dynamic", "none"] | Positive | None = "dynamic"  # resolution-dependent mu, a number, or None


def stratified_u(step: int, positions: list[int] | range, global_batch: int, seed: int) -> torch.Tensor:
    """One u in [0, 1) per global row position, each in its rotating stratum."""
    out = []
    for i in positions:
        gen = row_generator(seed, step, i, "timestep")
        stratum = (i + step) % global_batch
        out.append((stratum + torch.rand((), generator=gen, dtype=torch.float64).item()) / global_batch)
    return torch.tensor(out, dtype=torch.float64)


def base_sigmas(u: torch.Tensor, config: TimestepConfig, step: int) -> torch.Tensor:
    """Map u through the inverse CDF of the configured distribution (before the shift)."""
    if config.kind == "uniform":
        t = u
    elif config.kind == "logit_normal":
        z = torch.special.ndtri(u.clamp(EPS, 1 - EPS))
        t = torch.sigmoid(config.logit_mean + config.logit_std * z)
    else:
        progress = min(step / max(config.curriculum_steps, 1), 1.0)
        lo = config.curriculum_start * (1.0 - progress)
        t = lo + (1.0 - lo) * u
    return t.clamp(EPS, 1.0 - EPS)


def shift_sigmas(t: torch.Tensor, shift: str | float | None, image_seq_len: int, scheduler_config: dict
                 ) -> torch.Tensor:
    """The inference schedule's shift applied to training sigmas (exponential time shift with mu)."""
    if shift is None or shift == "none":
        return t
    if shift == "dynamic":
        mu = compute_mu(image_seq_len, scheduler_config)
        return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))
    s = float(shift)
    return s * t / (1.0 + (s - 1.0) * t)


def sample_sigmas(config: TimestepConfig, step: int, positions: list[int] | range, global_batch: int,
                  image_seq_len: int, scheduler_config: dict, seed: int = 0) -> torch.Tensor:
    """Sigmas (float32, in (0, 1)) for this rank's rows; the transformer's timestep is sigma itself."""
    u = stratified_u(step, positions, global_batch, seed)
    t = base_sigmas(u, config, step)
    return shift_sigmas(t, config.shift, image_seq_len, scheduler_config).float()
