"""What the LoRA package remembers about a transformer it changed, so that removal is exact.

The state lives in a registry owned by this module (keyed weakly by the transformer object), reached only through
:func:`lora_state`: no attribute is set on the transformer. A copy of a transformer made by
:func:`~firered_core.lora.view.with_loras` gets its own state (:meth:`LoraState.remapped`), pointing at the copy's
modules.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LoraState:
    """The LoRAs on one transformer.

    ``originals``: merged layers -> (the Linear, its original weight); ``wrapped``: module name -> the Linear that a
    :class:`~firered_core.lora.adapter.LoraLinear` replaced; ``applied``: ``(name, strength, mode)`` in order.
    """

    originals: dict[str, tuple[nn.Module, torch.Tensor]] = field(default_factory=dict)
    wrapped: dict[str, nn.Module] = field(default_factory=dict)
    applied: list[tuple[str, float, str]] = field(default_factory=list)

    def remapped(self, memo: Mapping[int, nn.Module]) -> LoraState:
        """This state for a copied tree (``memo``: id of an original module -> its copy)."""
        return LoraState({name: (memo[id(linear)], weight) for name, (linear, weight) in self.originals.items()},
                         {name: memo[id(base)] for name, base in self.wrapped.items()}, list(self.applied))


_STATES: weakref.WeakKeyDictionary[nn.Module, LoraState] = weakref.WeakKeyDictionary()


def lora_state(transformer: nn.Module, create: bool = False) -> LoraState | None:
    """The LoRA state of ``transformer`` (None when it has no LoRA and ``create`` is False)."""
    state = _STATES.get(transformer)
    if state is None and create:
        state = _STATES[transformer] = LoraState()
    return state


def set_lora_state(transformer: nn.Module, state: LoraState | None) -> None:
    """Give ``transformer`` a state (a copy's remapped one), or forget its state with None."""
    if state is None:
        _STATES.pop(transformer, None)
    else:
        _STATES[transformer] = state
