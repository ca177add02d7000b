"""GGUF block dequantisation: torch kernels (decode on the device that runs the layer) and the ``gguf`` package's
numpy reference (:func:`dequantize_reference`, for types without a kernel and for dequantise-at-load).

Each kernel ports the ``gguf`` package's numpy reference (``gguf.quants``) operation for operation in float32, so the
result is bit-identical to ``gguf.quants.dequantize`` in eager mode (tests check this on random bytes). Input: the
packed bytes as a uint8 tensor whose last dimension is a whole number of blocks; output: float32 (or ``dtype``).
Only byte-wise integer ops are used (no uint32 views), so the kernels run on any device and any byte alignment.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..errors import FormatError

QK_K = 256
# qtype id -> (name, values per block, bytes per block); ids are ggml's GGMLQuantizationType values.
BLOCKS: dict[int, tuple[str, int, int]] = {
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34),
    10: ("Q2_K", QK_K, 84), 11: ("Q3_K", QK_K, 110), 12: ("Q4_K", QK_K, 144), 13: ("Q5_K", QK_K, 176),
    14: ("Q6_K", QK_K, 210),
}
DENSE = {0: "F32", 1: "F16", 30: "BF16"}


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Two little-endian bytes per row -> float32 column (n, 1)."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _shifts(values: list[int], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device).reshape(shape)


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Low nibbles of each ``group`` bytes, then their high nibbles: ``(n, groups, 2, group)``."""
    n = qs.shape[0]
    return (qs.reshape(n, -1, 1, group) >> _shifts([0, 4], (1, 1, 2, 1), qs.device)) & 0x0F


def _bits(b: torch.Tensor) -> torch.Tensor:
    """Bits of bytes, least significant first: ``(n, k)`` bytes -> ``(n, k, 8)`` of 0/1 (little-endian bit order)."""
    return (b.unsqueeze(-1) >> _shifts(list(range(8)), (1, 1, 8), b.device)) & 1


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).to(torch.float32) * _f16(b[:, :2])


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 2:], 16).reshape(b.shape[0], -1).to(torch.int8) - 8
    return _f16(b[:, :2]) * q.to(torch.float32)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 4:], 16).reshape(b.shape[0], -1).to(torch.float32)
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _five_bit(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    high = _bits(qh).reshape(qh.shape[0], 32)
    return _nibbles(qs, 16).reshape(qs.shape[0], -1) | (high << 4)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _five_bit(b[:, 2:6], b[:, 6:]).to(torch.int8) - 16
    return _f16(b[:, :2]) * q.to(torch.float32)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _five_bit(b[:, 4:8], b[:, 8:]).to(torch.float32)
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0xF).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    q = (qs.reshape(n, -1, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), b.device)) & 3
    q = q.reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = (scales[:, :8].reshape(n, 1, 8) >> _shifts([0, 4], (1, 2, 1), b.device)).reshape(n, 16)
    high = (scales[:, 8:].reshape(n, 1, 4) >> _shifts([0, 2, 4, 6], (1, 4, 1), b.device)).reshape(n, 16)
    sc = ((low & 0x0F) | ((high & 0x03) << 4)).to(torch.int8) - 32
    dl = (d * sc.to(torch.float32)).reshape(n, 16, 1)
    ql = (qs.reshape(n, -1, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), b.device)).reshape(n, 16, 16) & 3
    qh = (hmask.reshape(n, -1, 1, 32) >> _shifts(list(range(8)), (1, 1, 8, 1), b.device)).reshape(n, 16, 16) & 1
    qh = qh ^ 1
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).to(torch.float32)
    return (dl * q).reshape(n, QK_K)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and mins packed in 12 bytes (Q4_K / Q5_K)."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.reshape(n, 8), mn.reshape(n, 8)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.to(torch.float32)).reshape(n, -1, 1)
    dm = (_f16(b[:, 2:4]) * mn.to(torch.float32)).reshape(n, -1, 1)
    q = _nibbles(b[:, 16:], 32).reshape(n, -1, 32).to(torch.float32)
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.to(torch.float32)).reshape(n, -1, 1)
    dm = (_f16(b[:, 2:4]) * mn.to(torch.float32)).reshape(n, -1, 1)
    qh, qs = b[:, 16:48], b[:, 48:]
    ql = _nibbles(qs, 32).reshape(n, -1, 32)
    high = ((qh.reshape(n, -1, 1, 32) >> _shifts(list(range(8)), (1, 1, 8, 1), b.device)) & 1).reshape(n, -1, 32)
    q = (ql | (high << 4)).to(torch.float32)
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    d = (d * scales.contiguous().view(torch.int8).to(torch.float32)).reshape(n, 16, 1)
    low = _nibbles(ql, 64).reshape(n, -1, 32)
    high = ((qh.reshape(n, -1, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), b.device)) & 3).reshape(n, -1, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, -1).to(torch.float32)
    return (d * q).reshape(n, QK_K)


KERNELS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1, 8: _q8_0, 10: _q2_k, 11: _q3_k, 12: _q4_k, 13: _q5_k, 14: _q6_k,
}


def qtype_name(qtype: int) -> str:
    qtype = int(qtype)
    return BLOCKS[qtype][0] if qtype in BLOCKS else DENSE.get(qtype, f"ggml type {qtype}")


def supported(qtype: int) -> bool:
    """Whether a GGUF tensor type has a torch kernel here (dense F32/F16/BF16 need none)."""
    return int(qtype) in KERNELS


def packed_nbytes(qtype: int, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of logical ``shape`` (last dim = a whole number of blocks) stored as ``qtype``."""
    _, size, nbytes = BLOCKS[int(qtype)]
    numel = 1
    for s in shape:
        numel *= int(s)
    return numel // size * nbytes


def dequantize(packed: torch.Tensor, qtype: int, shape: tuple[int, ...],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode packed GGUF bytes (uint8, any shape with ``packed_nbytes`` elements) to a ``shape`` tensor.

    Decoding happens in float32 on ``packed``'s device, then is cast to ``dtype`` (the same values a
    dequantise-at-load path produces).
    """
    qtype = int(qtype)
    if qtype not in KERNELS:
        raise NotImplementedError(f"no torch kernel for GGUF type {qtype_name(qtype)}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed GGUF data must be uint8, got {packed.dtype}")
    _, size, nbytes = BLOCKS[qtype]
    if shape[-1] % size or packed.numel() != packed_nbytes(qtype, shape):
        raise ValueError(f"{packed.numel()} bytes of {qtype_name(qtype)} do not hold a {tuple(shape)} tensor")
    out = KERNELS[qtype](packed.reshape(-1, nbytes))
    return out.reshape(shape).to(dtype)


def dequantize_reference(data, qtype, shape: tuple[int, ...], name: str = "") -> torch.Tensor:
    """Decode one GGUF tensor to float32 with the ``gguf`` package's numpy reference dequantiser (every type it
    knows, on the CPU); ``name`` is the file and key for the error when the package cannot decode the type."""
    import gguf

    try:
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            arr = np.array(data, dtype=np.float32)
        else:
            arr = gguf.quants.dequantize(np.asarray(data), qtype)
    except NotImplementedError as exc:
        raise FormatError(f"{name}: GGUF type {getattr(qtype, 'name', qtype)} cannot be dequantised by the "
                          "installed gguf package") from exc
    return torch.from_numpy(np.ascontiguousarray(arr)).reshape(shape)
