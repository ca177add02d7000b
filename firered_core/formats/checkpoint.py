"""The read-only, lazy ``{key: tensor}`` view every reader gives (:class:`Checkpoint`), and shape helpers."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch


class Checkpoint(Mapping):
    """A read-only ``{key: tensor}`` view of a file that loads each tensor only when it is indexed.

    ``shape(key)`` and ``dtype(key)`` answer from the header without reading data. ``metadata`` holds the file's
    string metadata (safetensors ``__metadata__``, GGUF key/values). ``quant_type(key)`` names the GGUF
    quantisation of a tensor, or None.
    """

    def __init__(self, path: Path, kind: str):
        self.path = path
        self.kind = kind
        self.metadata: dict[str, str] = {}

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype | None:
        raise NotImplementedError

    def quant_type(self, key: str) -> str | None:
        return None

    def close(self) -> None:
        """Drop file handles and maps (tensors already returned stay valid)."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def shape_of(value) -> tuple[int, ...]:
    """The shape of a tensor, of a header entry, or of a plain shape tuple."""
    if hasattr(value, "shape"):
        return tuple(value.shape)
    if isinstance(value, Mapping) and "shape" in value:
        return tuple(value["shape"])
    return tuple(value)


def shapes(source: Mapping) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` for a checkpoint (header only), a state dict, or a mapping of shapes."""
    if isinstance(source, Checkpoint):
        return {k: source.shape(k) for k in source}
    return {k: shape_of(v) for k, v in source.items()}
