"""Compiled GGUF decode (firered_core.kernels.gguf_fast): the traced graph (fullgraph, dynamic shapes) computes the
eager kernels' values for every block type on fresh random bytes, for several weight shapes with one compiled
function; on a CPU GGUFLinear keeps the eager decode. Its speed is measured on a GPU by benchmarks/gpu.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from firered_core.formats.gguf.kernels import BLOCKS, dequantize
from firered_core.kernels.gguf_fast import compiled_decoder, fast_dequantize


def random_blocks(qtype: int, rows: int, blocks_per_row: int, seed: int) -> torch.Tensor:
    nbytes = BLOCKS[qtype][2]
    raw = np.random.default_rng(seed).integers(0, 256, size=(rows, blocks_per_row * nbytes), dtype=np.uint8)
    return torch.from_numpy(raw)


@pytest.mark.parametrize("qtype", [8, 12, 14, 2], ids=["Q8_0", "Q4_K", "Q6_K", "Q4_0"])
def test_compiled_graph_equals_eager_kernels(qtype):
    torch._dynamo.reset()
    size = BLOCKS[qtype][1]
    fn = compiled_decoder(qtype, torch.float32, backend="aot_eager")
    for seed, (rows, nblocks) in enumerate([(3, 2), (7, 1), (4, 3)]):
        packed = random_blocks(qtype, rows, nblocks, seed + 10 * qtype)
        ref = dequantize(packed, qtype, (rows, nblocks * size))
        got = fn(packed).reshape(rows, nblocks * size)
        assert torch.equal(torch.isnan(ref), torch.isnan(got))
        finite = torch.isfinite(ref)
        assert finite.float().mean() > 0.5
        assert torch.equal(got[finite], ref[finite])
    torch._dynamo.reset()


def test_cpu_path_is_the_eager_decode():
    packed = random_blocks(8, 4, 2, 0)
    out = fast_dequantize(packed, 8, (4, 64), torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (4, 64)
    assert torch.equal(out, dequantize(packed, 8, (4, 64), torch.bfloat16))
