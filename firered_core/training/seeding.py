"""Deterministic per-row random streams: every random choice of a step is a function of (seed, step, row, stream).

This is what makes resume exact and a run's randomness independent of the number of processes.
"""

from __future__ import annotations

import numpy as np
import torch

STREAMS = {"timestep": 1, "noise": 2, "variant": 3, "alignment": 4, "rollout": 5}
STREAMS.update(distill=11, distill_segments=12)  # firered_core/training/distill.py: teacher noise, trained intervals


def row_seed(seed: int, step: int, position: int, stream: str) -> int:
    return int(np.random.SeedSequence([seed, step, position, STREAMS[stream]]).generate_state(1)[0])


def row_generator(seed: int, step: int, position: int, stream: str) -> torch.Generator:
    return torch.Generator().manual_seed(row_seed(seed, step, position, stream))


def row_rng(seed: int, step: int, position: int, stream: str) -> np.random.Generator:
    return np.random.default_rng(row_seed(seed, step, position, stream))
