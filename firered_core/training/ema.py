"""Exponential moving average of the trained weights (the report's weight averaging).

Kept in float32 on the parameters' device; ``decay`` warms up as ``min(decay, (1 + n) / (10 + n))`` so early
averages are not dominated by the initial weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .checkpoint import CheckpointError


class EMA:
    def __init__(self, named_params: dict[str, torch.Tensor], decay: float = 0.999, warmup: bool = True):
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.shadow = {k: p.detach().float().clone() for k, p in named_params.items()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, named_params: dict[str, torch.Tensor]) -> None:
        d = self.current_decay()
        for k, p in named_params.items():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, named_params: dict[str, torch.Tensor]) -> None:
        for k, p in named_params.items():
            p.copy_(self.shadow[k].to(p.dtype))

    @contextlib.contextmanager
    def applied(self, named_params: dict[str, torch.Tensor]) -> Iterator[None]:
        """The averaged weights in ``named_params`` for the duration of the block (e.g. validation), then the trained
        ones back exactly."""
        with kept(named_params):
            self.copy_to(named_params)
            yield

    def state_dict(self) -> dict:
        return {"tensors": dict(self.shadow), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["tensors"])
        if missing:
            raise CheckpointError(f"EMA state does not match the trained parameters ({len(missing)} names differ)")
        for k, v in state["tensors"].items():
            self.shadow[k].copy_(v)
        self.updates = int(state["updates"])


@contextlib.contextmanager
def kept(named_params: dict[str, torch.Tensor]) -> Iterator[None]:
    """Whatever the block writes into ``named_params``, their values before it come back exactly afterwards."""
    saved = {n: p.detach().clone() for n, p in named_params.items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in named_params.items():
                p.copy_(saved[n])
