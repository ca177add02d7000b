"""Columns of compact per-row descriptors (hashes, float scores, packed bits, byte strings) appended shard by
shard and read back as numpy arrays: the only O(rows) state of a stage's dataset-level fit.

With a folder the columns are raw files on disk, memory-mapped when read (the driver holds no Python object per
row); without one (unit tests, in-memory calls) they are numpy arrays in memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class Spill:
    def __init__(self, folder: Path | None = None):
        self.folder = folder
        self._meta: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}  # name -> dtype, row shape, rows
        self._mem: dict[str, list[np.ndarray]] = {}
        if folder is not None and folder.exists():
            for old in folder.glob("*.bin"):  # a re-run of an interrupted fit starts from empty columns
                old.unlink()

    def append(self, name: str, values, dtype) -> None:
        """Append rows (the first axis of ``values``) to column ``name``."""
        arr = np.ascontiguousarray(np.asarray(values, dtype=dtype))
        if arr.ndim == 0:
            arr = arr[None]
        dt, shape, n = self._meta.get(name, (arr.dtype, arr.shape[1:], 0))
        if arr.shape[1:] != shape or arr.dtype != dt:
            raise ValueError(f"column {name}: rows of {arr.dtype} {arr.shape[1:]} after {dt} {shape}")
        self._meta[name] = (dt, shape, n + len(arr))
        if self.folder is None:
            self._mem.setdefault(name, []).append(arr)
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.folder / f"{name}.bin", "ab") as fh:
                arr.tofile(fh)

    def append_bytes(self, name: str, items: list[bytes]) -> None:
        """Variable-length byte strings: a uint8 blob plus the end offset of each."""
        ends = np.cumsum([len(b) for b in items], dtype=np.int64) + self.rows(f"{name}.blob")
        self.append(f"{name}.blob", np.frombuffer(b"".join(items), dtype=np.uint8), np.uint8)
        self.append(f"{name}.end", ends, np.int64)

    def rows(self, name: str) -> int:
        return self._meta[name][2] if name in self._meta else 0

    def get(self, name: str, dtype=None, shape: tuple[int, ...] = ()) -> np.ndarray:
        """Column ``name`` (empty of ``dtype`` / ``shape`` when nothing was appended)."""
        if name not in self._meta:
            return np.zeros((0, *shape), dtype=dtype or np.float64)
        dt, shape, n = self._meta[name]
        if self.folder is None:
            return np.concatenate(self._mem[name])
        if n == 0:
            return np.zeros((0, *shape), dtype=dt)
        return np.memmap(self.folder / f"{name}.bin", dtype=dt, mode="r", shape=(n, *shape))

    def strings(self, name: str) -> "Strings":
        return Strings(self.get(f"{name}.blob", np.uint8), self.get(f"{name}.end", np.int64))


class Strings:
    """Read access to a spilled column of byte strings (UTF-8 text)."""

    def __init__(self, blob: np.ndarray, ends: np.ndarray):
        self.blob, self.ends = blob, ends

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> str:
        start = int(self.ends[i - 1]) if i > 0 else 0
        return bytes(self.blob[start:int(self.ends[i])]).decode("utf-8")

    def ranks(self) -> np.ndarray:
        """Each string's rank in the sorted set of distinct strings (UTF-8 byte order = Python str order)."""
        n = len(self.ends)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        starts = np.concatenate([[0], self.ends[:-1]]).astype(np.int64)
        lengths = np.asarray(self.ends, dtype=np.int64) - starts
        width = max(int(lengths.max()), 1)
        fixed = np.zeros((n, width), dtype=np.uint8)
        for j in range(width):  # column by column: n bytes at a time
            has = lengths > j
            fixed[has, j] = self.blob[starts[has] + j]
        return np.unique(fixed.view(f"S{width}").ravel(), return_inverse=True)[1].astype(np.int64)
