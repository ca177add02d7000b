"""Progress, previews and cancelling: ComfyUI's progress bar, its previewer and its Cancel button, with plain
stand-ins outside ComfyUI (tests record the updates and cancel through :func:`interrupt`)."""

from __future__ import annotations

import threading
from typing import Callable

import torch

from firered_core import preview as P

from . import _comfy

PREVIEW_SIZE = 512


class Interrupted(Exception):
    """Raised when the user cancels outside ComfyUI (ComfyUI raises its own exception)."""


_interrupt = threading.Event()


def interrupt() -> None:
    """Request cancellation of the running node (outside ComfyUI; ComfyUI has its own Cancel button)."""
    _interrupt.set()


def throw_if_interrupted() -> None:
    if _comfy.IN_COMFY:
        _comfy.mm.throw_exception_if_processing_interrupted()
    elif _interrupt.is_set():
        _interrupt.clear()
        raise Interrupted("processing interrupted")


class PlainProgressBar:
    """Stand-in for ``comfy.utils.ProgressBar`` that records its updates."""

    def __init__(self, total: int):
        self.total, self.current, self.updates = total, 0, []

    def update_absolute(self, value: int, total: int | None = None, preview=None) -> None:
        self.total = total or self.total
        self.current = min(value, self.total)
        self.updates.append((self.current, self.total, preview))


def progress_bar(total: int):
    return _comfy.utils.ProgressBar(total) if _comfy.IN_COMFY else PlainProgressBar(total)


def previewer() -> Callable[[torch.Tensor], object | None]:
    """A function from a normalised 5-D latent to a preview for ``ProgressBar.update_absolute``.

    In ComfyUI it is the user's chosen previewer for the Wan 2.1 latent space (None when previews are off).
    """
    if _comfy.IN_COMFY:
        try:
            import comfy.latent_formats
            import latent_preview
        except ImportError:
            return lambda z: None
        impl = latent_preview.get_previewer(_comfy.torch_device(), comfy.latent_formats.Wan21())
        if impl is None:
            return lambda z: None
        return lambda z: impl.decode_latent_to_preview_image("JPEG", z)
    return lambda z: ("JPEG", P.latent_to_rgb(z), PREVIEW_SIZE)
