"""ComfyUI's memory manager as FireRed's :class:`~firered_core.memory.managed.MemoryManager`: each component a
``ModelPatcher`` loaded with ``load_models_gpu``, so ComfyUI frees its other models for it, unloads it for them, and
its Unload Models / Free buttons and POST /free reach it. What to do when a component does not fit is FireRed's own
policy (:class:`~firered_core.memory.managed.ManagedPlacement`); outside ComfyUI the plain manager stands in.
"""

from __future__ import annotations

import torch

from firered_core.memory.managed import ManagedPlacement, PlainMemoryManager, holder_for

from . import _comfy


class ComfyMemoryManager:
    """The manager contract on ComfyUI's public ``comfy.model_management`` calls (one private one wrapped in
    :func:`unload_one`)."""

    def wrap(self, name: str, module: torch.nn.Module, device: torch.device):
        import comfy.model_patcher

        return comfy.model_patcher.ModelPatcher(holder_for(name, module, device), load_device=device,
                                                offload_device=_comfy.mm.unet_offload_device())

    def size(self, handle) -> int:
        return handle.model_size()

    def free_bytes(self, device: torch.device) -> int | None:
        return None if device.type == "cpu" else _comfy.mm.get_free_memory(device)

    def free(self, nbytes: int, device: torch.device) -> None:
        _comfy.mm.free_memory(nbytes, device)

    def load(self, handle) -> None:
        _comfy.mm.load_models_gpu([handle], force_full_load=True)

    def unload(self, handle) -> None:
        unload_one(handle)

    def empty_cache(self) -> None:
        _comfy.mm.soft_empty_cache()

    @property
    def loaded(self) -> list:
        return [m for m in _comfy.mm.loaded_models() if m is not None]


def unload_one(handle) -> None:
    """Unload one ``ModelPatcher`` from ComfyUI's list of loaded models.

    ComfyUI has no public call for one model (only ``free_memory``, which picks its own victims, and
    ``unload_all_models``), so this is the one place that reads its private list. Checked against ComfyUI v0.3.64
    (commit a125cd84): ``model_management.current_loaded_models`` is a list of ``LoadedModel``, whose ``model`` is the
    patcher and whose ``model_unload()`` detaches it (weights back to its offload device); ComfyUI's own
    ``free_memory`` pops an entry from the list after ``model_unload()``, as done here.
    """
    loaded_models = _comfy.mm.current_loaded_models
    for loaded in list(loaded_models):
        if loaded.model is handle:
            loaded.model_unload()
            loaded_models.remove(loaded)


def memory_manager():
    """ComfyUI's memory manager inside ComfyUI, the plain stand-in elsewhere."""
    return ComfyMemoryManager() if _comfy.IN_COMFY else PlainMemoryManager()


def placement() -> ManagedPlacement:
    """The placement of a model a FireRed loader makes: components handed to :func:`memory_manager`."""
    return ManagedPlacement(memory_manager())
