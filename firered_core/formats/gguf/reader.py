"""Reading GGUF files lazily (memory-mapped): tensors decoded to float32 on indexing, or handed over packed."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..errors import FormatError
from .kernels import dequantize_reference


class GGUFCheckpoint(Checkpoint):
    """GGUF tensors dequantised to float32 on indexing (:meth:`packed` gives the quantised bytes)."""

    def __init__(self, path: Path):
        super().__init__(path, "gguf")
        import gguf

        try:
            self._reader = gguf.GGUFReader(str(path), "r")
        except Exception as exc:
            raise FormatError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from exc
        self._tensors = {t.name: t for t in self._reader.tensors}
        for field in self._reader.fields.values():
            if field.types and field.types[0] == gguf.GGUFValueType.STRING and len(field.types) == 1:
                self.metadata[field.name] = str(bytes(field.parts[field.data[0]]), "utf-8", "replace")

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self._tensors[key]
        return dequantize_reference(t.data, t.tensor_type, self.shape(key), name=f"{self.path}:{key}")

    def packed(self, key: str) -> tuple[torch.Tensor, int]:
        """``(bytes, qtype id)`` of a tensor as stored: a uint8 tensor sharing the file's read-only memory map
        (no copy; never write into it), for :class:`~firered_core.formats.gguf.linear.GGUFLinear`."""
        t = self._tensors[key]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")
            data = torch.from_numpy(t.data.reshape(-1).view(np.uint8))
        return data, int(t.tensor_type)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[key].shape))

    def dtype(self, key: str) -> torch.dtype | None:
        return None

    def quant_type(self, key: str) -> str | None:
        return self._tensors[key].tensor_type.name

    def close(self) -> None:
        self._reader = None
