"""Writing GGUF files (a conversion tool for tests and benchmarks, kept apart from the runtime readers)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch


def write_gguf(state: Mapping[str, torch.Tensor], path: str | Path, qtype: str = "Q8_0",
               arch: str = "qwen_image") -> Path:
    """Write ``state`` as GGUF: 2-D weights whose rows split into 32-value blocks are quantised to ``qtype``
    (a ``gguf.GGMLQuantizationType`` name the ``gguf`` package can quantise, e.g. Q8_0, Q4_0), the rest stay F32.
    """
    import gguf

    quant = getattr(gguf.GGMLQuantizationType, qtype)
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in state.items():
        arr = value.float().numpy()
        if arr.ndim == 2 and arr.shape[1] % 32 == 0:
            writer.add_tensor(key, gguf.quants.quantize(arr, quant), raw_dtype=quant)
        else:
            writer.add_tensor(key, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
