"""Lazy readers for single checkpoint files: safetensors (mmap), GGUF (mmap) and legacy torch files.

Nothing here unpickles: legacy ``.pt`` / ``.bin`` / ``.ckpt`` files are opened with ``torch.load(weights_only=True,
mmap=True)``. Tensors are read one at a time on request, so peak memory while loading is the size of the converted
model plus one tensor, never twice the file.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .errors import FormatError
from .gguf.reader import GGUFCheckpoint

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
LEGACY_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsCheckpoint(Checkpoint):
    def __init__(self, path: Path):
        super().__init__(path, "safetensors")
        self._header = _read_safetensors_header(path)
        self.metadata = dict(self._header.pop("__metadata__", None) or {})
        from safetensors import safe_open

        try:
            self._file = safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:
            raise FormatError(f"{path}: not a readable safetensors file ({exc})") from exc

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._header:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._header)

    def __len__(self) -> int:
        return len(self._header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def dtype(self, key: str) -> torch.dtype | None:
        return SAFETENSORS_DTYPES.get(self._header[key]["dtype"])

    def close(self) -> None:
        self._file = None


def _header_entry_problem(key: str, entry: object) -> str | None:
    """What is wrong with one header entry (None when it is a well-formed tensor record or the metadata)."""
    if key == "__metadata__":
        ok = entry is None or (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values()))
        return None if ok else "__metadata__ is not a mapping of strings"
    if not isinstance(entry, dict):
        return f"tensor {key!r} is described by a {type(entry).__name__}, not a record"
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(entry.get("dtype"), str):
        return f"tensor {key!r} has no dtype"
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        return f"tensor {key!r} has shape {shape!r}, not a list of sizes"
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        return f"tensor {key!r} has data_offsets {offsets!r}, not [begin, end]"
    return None


def _read_safetensors_header(path: Path) -> dict:
    """Parse and validate the header; a truncated or foreign file fails here with what was found."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise FormatError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > _MAX_HEADER or n > size - 8:
            raise FormatError(f"{path}: not a safetensors file (header length {n} does not fit a {size}-byte file; "
                              f"first bytes {head!r})")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: not a safetensors file (header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise FormatError(f"{path}: not a safetensors file (header is a {type(header).__name__})")
    for key, entry in header.items():
        problem = _header_entry_problem(key, entry)
        if problem:
            raise FormatError(f"{path}: malformed safetensors header: {problem}")
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise FormatError(f"{path}: truncated safetensors file: the header describes {8 + n + end} bytes, "
                          f"the file has {size} (an interrupted download? re-download it)")
    return header


class TorchCheckpoint(Checkpoint):
    """A legacy torch file, read with ``weights_only=True`` (no pickle code runs) and memory-mapped."""

    def __init__(self, path: Path):
        super().__init__(path, "torch")
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise FormatError(f"{path}: cannot be read as a weights-only torch file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); only safetensors, GGUF and "
                              "weights-only .pt/.bin files are accepted, never arbitrary pickles") from exc
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise FormatError(f"{path}: a torch file but not a state dict of tensors (found {type(obj).__name__})")
        self._sd = obj

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._sd[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sd)

    def __len__(self) -> int:
        return len(self._sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd[key].shape)

    def dtype(self, key: str) -> torch.dtype | None:
        return self._sd[key].dtype


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open one weights file lazily, choosing the reader from its first bytes (not only its name)."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"checkpoint file not found: {path}")
    if path.is_dir():
        raise FormatError(f"{path} is a folder; give a single weights file (or load the folder as a Hugging Face "
                          "component)")
    with open(path, "rb") as fh:
        magic = fh.read(8)
    if magic[:4] == b"GGUF":
        return GGUFCheckpoint(path)
    if magic[:2] == b"PK" or magic[:1] == b"\x80" or path.suffix.lower() in LEGACY_SUFFIXES:
        return TorchCheckpoint(path)
    if path.suffix.lower() == ".gguf":
        raise FormatError(f"{path}: named .gguf but does not start with the GGUF magic (found {magic[:4]!r})")
    return SafetensorsCheckpoint(path)
