"""FireRed models under a host's memory manager, and FireRed's fallback when a component does not fit.

A host (ComfyUI) keeps a list of loaded models and frees some of them to make room for the next. A
:class:`MemoryManager` is that contract as FireRed needs it: ``wrap`` a component into the host's handle, ``size`` of
a handle, ``free_bytes`` on a device, ``free`` room, ``load`` and ``unload`` a handle. :class:`PlainMemoryManager`
keeps it without any host (tests, scripts); ``nodes/_memory.py`` gives ComfyUI's.

:class:`ManagedPlacement` is the :class:`~firered_core.model.Placement` that hands each component to the manager
before it runs, and, when a component is larger than what is free even after the manager freed all it could, runs
a fallback for that run instead of running out of memory (:meth:`ManagedPlacement.fallback`): the transformer with
block swap, the text encoder with its decoder layers streamed (or on the offload device when not even that fits),
the VAE tiled (or on the offload device). Nothing here knows ComfyUI.
"""

from __future__ import annotations

import logging
from typing import Callable, Protocol

import torch

from ..model import Placement
from . import (BlockSwap, OnDevice, TiledOnOOM, enable_vae_tiling, fit_resident, is_block_swapped,
               text_encoder_layers, unwrapped, weight_bytes)

log = logging.getLogger(__name__)
FREE_MARGIN = 1.2  # room asked for beyond a component's weights (activations), as a factor
COMPONENT_CLASS = {"transformer": "FireRedTransformer", "vae": "FireRedVAE", "text_encoder": "FireRedTextEncoder"}


class ComponentHolder(torch.nn.Module):
    """A FireRed component as a host's model handle expects a model: ``device`` is writable here (diffusers /
    transformers models have a read-only one), the weights are in ``inner``. ComfyUI's ``ModelPatcher`` adds the
    bookkeeping fields it needs itself."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        super().__init__()
        self.inner = module
        self.device = device


def holder_for(name: str, module: torch.nn.Module, device: torch.device) -> ComponentHolder:
    """The holder, of a class named for the component (ComfyUI logs "Requested to load FireRedTransformer")."""
    cls = type(COMPONENT_CLASS.get(name, "FireRedComponent"), (ComponentHolder,), {})
    return cls(module, device)


class MemoryManager(Protocol):
    """What :class:`ManagedPlacement` asks of a host's memory manager."""

    def wrap(self, name: str, module: torch.nn.Module, device: torch.device): ...

    def size(self, handle) -> int: ...

    def free_bytes(self, device: torch.device) -> int | None: ...  # None: no limit known (a CPU)

    def free(self, nbytes: int, device: torch.device) -> None: ...

    def load(self, handle) -> None: ...

    def unload(self, handle) -> None: ...

    def empty_cache(self) -> None: ...  # hand freed device memory back (after a fallback is undone)


class PlainMemoryManager:
    """The memory-manager contract without a host (tests, scripts): a list of loaded handles, most recent first;
    loading one frees others (least recent first) until it fits in ``budget`` bytes (None = unlimited)."""

    def __init__(self, budget: int | None = None, offload: torch.device = torch.device("cpu")):
        self.budget, self.offload, self.loaded = budget, offload, []

    def wrap(self, name: str, module: torch.nn.Module, device: torch.device):
        return holder_for(name, module, device)

    def size(self, handle) -> int:
        return weight_bytes(handle)

    def free_bytes(self, device: torch.device) -> int | None:
        return None if self.budget is None else self.budget - sum(self.size(h) for h in self.loaded)

    def free(self, nbytes: int, device: torch.device) -> None:
        while self.loaded and self.budget is not None and self.free_bytes(device) < nbytes:
            self.unload(self.loaded[-1])

    def load(self, handle) -> None:
        if handle in self.loaded:
            self.loaded.remove(handle)
        self.free(self.size(handle), handle.device)
        handle.to(handle.device)
        self.loaded.insert(0, handle)

    def unload(self, handle) -> None:
        if handle in self.loaded:
            self.loaded.remove(handle)
            handle.to(self.offload)

    def unload_all(self) -> None:
        for handle in list(self.loaded):
            self.unload(handle)

    def empty_cache(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _gb(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MB"


def _where(module: torch.nn.Module) -> torch.device:
    return next(iter(module.parameters())).device


class ManagedPlacement(Placement):
    """Each component handed to ``manager`` right before it runs (which frees the host's other models to make room
    and moves it to the device), and kept known there, so the host can unload it for its own models (ComfyUI: its
    Unload Models / Free buttons and POST /free). ``offload="model"`` hands it back right after it ran.

    A component larger than the free memory even after the manager freed everything it could runs a fallback for
    that run, after a log line (:meth:`fallback`). The fallback is undone when the component is released: no hooks
    left, the weights back on the offload device, and the next run decides again from the free memory then. A
    resident VAE retries tiled when a decode / encode runs out of memory (its room to work depends on the picture,
    which is not known here)."""

    def __init__(self, manager: MemoryManager | None = None):
        self.manager = manager if manager is not None else PlainMemoryManager()
        self.handles: dict[str, tuple[torch.nn.Module, object]] = {}
        self.undo: dict[str, Callable[[], None]] = {}

    def home_device(self, model, name: str) -> torch.device:
        return torch.device("cpu") if model.device.type != "cpu" else model.device

    def handle(self, model, name: str, module: torch.nn.Module):
        """The manager's handle of ``module`` (one per component name: a new module, e.g. a LoRA view's
        transformer, replaces the old one, which is unloaded first)."""
        old = self.handles.get(name)
        if old is not None and old[0] is module:
            return old[1]
        if old is not None:
            self.manager.unload(old[1])
        handle = self.manager.wrap(name, module, model.device)
        self.handles[name] = (module, handle)
        return handle

    def acquire(self, model, name: str, module: torch.nn.Module):
        if is_block_swapped(module):  # the user's own block swap (speed settings) places the weights
            return module
        handle = self.handle(model, name, module)
        size = self.manager.size(handle)
        need = int(size * FREE_MARGIN)
        self.manager.free(need, model.device)
        free = self.manager.free_bytes(model.device)
        if free is None or need <= free:
            self.manager.load(handle)
            if name == "vae" and getattr(module, "use_tiling", True) is False:
                return TiledOnOOM(module)  # its room to work depends on the picture: tiles if it runs short
            return module
        return self.fallback(model, name, module, handle, size, free)

    def fallback(self, model, name: str, module: torch.nn.Module, handle, size: int, free: int):
        """Run ``module`` (``size`` bytes of weights, more than fit in ``free`` with room to work) without running
        out of memory; the way back is kept in :attr:`undo` for :meth:`release`.

        - transformer: block swap of its blocks, as many resident as fit;
        - text encoder: block swap of its decoder layers; on the offload device when not even that fits;
        - VAE: its weights fit but not its room to work: tiled on the device; they do not fit: on the offload device.
        """
        room = max(0, int(free / FREE_MARGIN))
        what = f"the {name.replace('_', ' ')} ({_gb(size)}) does not fit in the {_gb(free)} free on {model.device}"
        if name == "vae" and hasattr(module, "enable_tiling") and size <= free:  # weights fit, not the work
            self.manager.load(handle)
            was = bool(getattr(module, "use_tiling", False))
            enable_vae_tiling(module, True)
            log.warning("FireRed: %s with room to work; decoding / encoding it in tiles", what)
            self.undo[name] = lambda: enable_vae_tiling(module, was)
            return module
        self.manager.unload(handle)
        home = _where(module)
        blocks = (getattr(module, "transformer_blocks", None) if name == "transformer" else
                  text_encoder_layers(module) if name == "text_encoder" else None)
        resident = None if blocks is None else fit_resident(size, [weight_bytes(b) for b in blocks], room)
        if blocks is not None and (resident is not None or name == "transformer"):
            resident = resident or 0
            unit = "blocks" if name == "transformer" else "decoder layers"
            log.warning("FireRed: %s; running it with block swap (%d of %d %s resident, the rest streamed) instead "
                        "of running out of memory", what, resident, len(blocks), unit)
            swap = BlockSwap(module, resident, model.device, blocks=blocks)
            self.undo[name] = lambda: swap.remove(to=home)
            return module
        log.warning("FireRed: %s%s; running it on %s (slow) instead of running out of memory", what,
                    ", not even with its decoder layers streamed" if blocks is not None else "", home)
        self.undo[name] = lambda: None
        return OnDevice(module, home, model.device)

    def release(self, model, name: str, module) -> None:
        module = unwrapped(module)
        undo = self.undo.pop(name, None)
        if undo is not None:
            undo()
            self.manager.empty_cache()
        if model.offload == "model" and name in self.handles and self.handles[name][0] is module:
            self.manager.unload(self.handles[name][1])

    def forget(self) -> None:
        """Undo any fallback, unload every component from the manager and drop the handles (the model is being
        unloaded)."""
        for undo in self.undo.values():
            undo()
        self.undo.clear()
        for _module, handle in self.handles.values():
            self.manager.unload(handle)
        self.handles.clear()
