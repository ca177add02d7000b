"""The model view: a transformer copy (or a whole :class:`FireRedModel` view) with LoRAs, leaving the source model
bit-exactly as it was for its other users."""

from __future__ import annotations

import copy
from collections import ChainMap, OrderedDict
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from ..model import FireRedModel
from .apply import LoraSpec, apply_loras, default_mode
from .errors import LoraError
from .report import LoraReport
from .schedule import model_schedule, schedule_of
from .state import lora_state, set_lora_state


def _refuse_prepared(transformer: nn.Module) -> None:
    """LoRAs go onto plain weights: refuse a transformer already quantised, block-swapped or compiled."""
    from ..memory import QuantLinear, is_block_swapped

    done = []
    if any(isinstance(m, QuantLinear) and not getattr(m, "from_file", False) for m in transformer.modules()):
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


def with_loras(transformer: nn.Module, specs: Sequence[LoraSpec | str | Path], mode: str | None = None,
               allow_partial: bool = False) -> tuple[nn.Module, LoraReport]:
    """A copy of ``transformer`` with ``specs`` applied; ``transformer`` itself stays bit-exactly as it was.

    Every module object is copied and every tensor shared, except that merging gives only the touched layers new
    weight tensors (copy-on-write: the touched weights take twice their memory while both models live) and adapters
    add only the LoRA's own tensors. The copy is a new object, not yet prepared, so the model's speed settings
    apply to it on its first ``model.use``. LoRAs already applied to ``transformer`` carry over, so calls
    chain (and :func:`~firered_core.lora.apply.remove_loras` on the copy restores its source's base weights).
    ``mode`` None: :func:`~firered_core.lora.apply.default_mode`.
    """
    _refuse_prepared(transformer)
    memo: dict[int, nn.Module] = {}
    clone = _copy_tree(transformer, memo)
    state = lora_state(transformer)
    if state is not None:
        set_lora_state(clone, state.remapped(memo))
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
        # a distilled LoRA's sampling schedule (its own, or one a LoRA below this view brought)
        self.lora_schedule = schedule_of(self.specs, model_schedule(base))
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
