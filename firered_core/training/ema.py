"""Exponential moving average of the trained weights (the report's weight averaging).

Kept in float32 on the parameters' device; ``decay`` warms up as ``min(decay, (1 + n) / (10 + n))`` so early
averages are not dominated by the initial weights.

Under FSDP (``use_orig_params``) the trained tensors outside a forward are views of this rank's shard: the average is
then kept on those shards (made from them after ``prepare``), updated and swapped into them in place; passing the
FSDP-wrapped ``model`` makes its next forward gather the swapped-in shards, and checkpoints gather the average into
whole tensors (the same file as without FSDP, so DDP and FSDP checkpoints resume each other).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .checkpoint import CheckpointError
from .shards import full_state, is_fsdp, load_full_state, regather


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
    def applied(self, named_params: dict[str, torch.Tensor], model: torch.nn.Module | None = None) -> Iterator[None]:
        """The averaged weights in ``named_params`` for the duration of the block (e.g. validation), then the trained
        ones back exactly. With an FSDP ``model`` its forwards gather the averaged shards, then the trained ones."""
        try:
            with kept(named_params):
                self.copy_to(named_params)
                regather(model)
                yield
        finally:
            regather(model)

    def whole(self, named_params: dict[str, torch.Tensor] | None = None,
              model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The averaged tensors, whole. With an FSDP ``model`` (``named_params`` its trained tensors, this rank's
        shards) they are gathered from every rank: a collective, rank 0 gets them, the other ranks ``{}``."""
        if is_fsdp(model):
            with self.applied(named_params, model):
                return full_state(model, self.shadow)
        return dict(self.shadow)

    def state_dict(self, named_params: dict[str, torch.Tensor] | None = None,
                   model: torch.nn.Module | None = None) -> dict:
        """Whole tensors (see :meth:`whole`), the update count and the decay."""
        return {"tensors": self.whole(named_params, model), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict, named_params: dict[str, torch.Tensor] | None = None,
                        model: torch.nn.Module | None = None) -> None:
        """Whole tensors back (see :meth:`load_whole`) and the update count."""
        missing = set(self.shadow) ^ set(state["tensors"])
        if missing:
            raise CheckpointError(f"EMA state does not match the trained parameters ({len(missing)} names differ)")
        self.load_whole(state["tensors"], named_params, model)
        self.updates = int(state["updates"])

    @torch.no_grad()
    def load_whole(self, tensors: dict[str, torch.Tensor], named_params: dict[str, torch.Tensor] | None = None,
                   model: torch.nn.Module | None = None) -> None:
        """Set the average from whole tensors (the same on every rank). With an FSDP ``model`` (a collective) this
        rank's shard of each is cut by writing them into the model's trained tensors, which are then put back."""
        if is_fsdp(model):
            with kept(named_params):
                load_full_state(model, tensors)
                for n, p in named_params.items():
                    self.shadow[n].copy_(p)
            regather(model)
            return
        for k, v in tensors.items():
            self.shadow[k].copy_(v)


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
