"""Attention backend choice (firered_core.kernels.attention): each backend gives the plain edit within float
rounding on this CPU (the preferred kernel, or the next one torch has), survives regional compile with
fullgraph=True, and restores cleanly; sage without its package is a clear error; auto resolves per device.
Speed per backend and SageAttention's error are measured on a GPU by benchmarks/gpu.py."""

from __future__ import annotations

import pytest
import torch

from firered_core.kernels.attention import attention_backend_of, resolve, sage_installed, set_attention_backend
from firered_core.speed import ModelSettings, SettingsError, compile_blocks

from speed_helpers import edit, fresh_model, max_diff


@pytest.fixture(scope="module")
def image():
    from conftest import random_image

    return random_image(64, 48)


@pytest.fixture(scope="module")
def plain(tiny_model_dir, image):
    return edit(fresh_model(tiny_model_dir), image, steps=2).latents


@pytest.mark.parametrize("backend", ["flash", "efficient", "cudnn"])
def test_sdpa_backends_match_plain(tiny_model_dir, image, plain, backend):
    model = fresh_model(tiny_model_dir, ModelSettings(attention=backend))
    out = edit(model, image, steps=2).latents
    assert attention_backend_of(model.transformer) == backend
    assert max_diff(out, plain) < 1e-4


def test_backend_is_compiled_without_graph_breaks_and_restores(tiny_model_dir, image, plain):
    model = fresh_model(tiny_model_dir)
    tr = model.transformer
    assert set_attention_backend(tr, "flash") == "flash"
    assert set_attention_backend(tr, "flash") == "flash"  # idempotent: no wrapper around a wrapper
    assert type(tr.transformer_blocks[0].attn.processor).__mro__[1].__name__ == "QwenDoubleStreamAttnProcessor2_0"
    # one class for every block, else a compiled block would recompile per block (dynamo guards on the type)
    assert len({type(b.attn.processor) for b in tr.transformer_blocks}) == 1
    torch._dynamo.reset()
    compile_blocks(tr, backend="eager")
    try:
        out = edit(model, image, steps=2).latents
    finally:
        torch._dynamo.reset()
    assert max_diff(out, plain) < 1e-4
    set_attention_backend(tr, "sdpa")
    assert type(tr.transformer_blocks[0].attn.processor).__name__ == "QwenDoubleStreamAttnProcessor2_0"
    assert attention_backend_of(tr) == "sdpa"


def test_resolve_and_validation():
    assert resolve("auto", "cpu") == "sdpa"
    assert resolve("cudnn", "cpu") == "cudnn"
    with pytest.raises(SettingsError, match="attention='bogus'"):
        ModelSettings(attention="bogus")
    if not sage_installed():
        with pytest.raises(ValueError, match="sageattention"):
            resolve("sage", "cpu")
