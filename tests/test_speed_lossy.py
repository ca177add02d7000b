"""Weight-only quantisation: output projections stay full precision and the edit stays within a printed bound;
compiled blocks give the same result with no graph break, LoRA-style wrappers included."""

from __future__ import annotations

import os

import pytest
import torch

from firered_core.memory import QuantLinear, quantize_text_encoder, quantize_transformer, weight_bytes
from firered_core.speed import ModelSettings, compile_blocks

from speed_helpers import edit, fresh_model, max_diff, rel_err

QUANT_BOUND = {"int8": 0.01, "fp8": 0.02}


@pytest.fixture(scope="module")
def image():
    from conftest import random_image

    return random_image(64, 48)


@pytest.fixture(scope="module")
def plain(tiny_model_dir, image):
    return edit(fresh_model(tiny_model_dir), image).latents


@torch.no_grad()
def test_quant_linear_error_is_small():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(4, 64)
    for mode, bound in (("int8", 0.01), ("fp8", 0.05)):
        q = QuantLinear(lin, mode)
        assert rel_err(q(x), lin(x)) < bound
        assert q.weight.shape == lin.weight.shape


def test_output_projections_stay_full_precision(tiny_model_dir):
    model = fresh_model(tiny_model_dir)
    before = weight_bytes(model.transformer)
    count = quantize_transformer(model.transformer, "int8")
    tr = model.transformer
    assert count > 0 and weight_bytes(tr) < before
    for name in ("proj_out", "img_in", "txt_in"):
        assert type(getattr(tr, name)) is torch.nn.Linear
    assert type(tr.norm_out.linear) is torch.nn.Linear
    assert isinstance(tr.transformer_blocks[0].attn.to_q, QuantLinear)
    assert quantize_text_encoder(model.text_encoder, "fp8") > 0
    assert type(model.text_encoder.lm_head) is torch.nn.Linear


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantised_edit_within_bound(tiny_model_dir, image, plain, mode):
    settings = ModelSettings(quantize=mode, quantize_text_encoder=mode)
    out = edit(fresh_model(tiny_model_dir, settings), image).latents
    err = rel_err(out, plain)
    print(f"{mode}: relative latent error {err:.4f} (bound {QUANT_BOUND[mode]})")
    assert err < QUANT_BOUND[mode]


def add_loras(transformer) -> None:
    """Runtime adapters of ``firered_core.lora`` (two per layer, so the adapter loop is exercised)."""
    from firered_core.lora import LoraLinear

    gen = torch.Generator().manual_seed(0)
    for block in transformer.transformer_blocks:
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "to_add_out"):
            wrapped = LoraLinear(getattr(block.attn, name))
            for scale in (0.5, -0.25):
                wrapped.add(scale, torch.randn(4, wrapped.in_features, generator=gen) * 0.1,
                            torch.randn(wrapped.out_features, 4, generator=gen) * 0.1)
            setattr(block.attn, name, wrapped)


def test_compiled_blocks_match_without_graph_breaks(tiny_model_dir, image):
    """fullgraph=True turns any graph break into an error; the eager backend keeps this test fast on a CPU.
    FIRERED_TEST_INDUCTOR=1 also compiles with inductor (about a minute on two cores)."""
    base = fresh_model(tiny_model_dir)
    add_loras(base.transformer)
    expected = edit(base, image).latents
    compiled = fresh_model(tiny_model_dir)
    compiled.set("transformer", base.transformer)
    torch._dynamo.reset()
    backend = "inductor" if os.environ.get("FIRERED_TEST_INDUCTOR") else "eager"
    compile_blocks(base.transformer, backend=backend)
    out = edit(compiled, image).latents
    torch._dynamo.reset()
    assert max_diff(out, expected) < 1e-5


def test_vae_tiling_decodes_large_images_in_tiles_within_bound(tiny_model_dir, image):
    """Above one tile (256 px) the VAE decodes in overlapping tiles; the seams cost little (bound printed)."""
    import numpy as np

    def run(tiling: bool):
        model = fresh_model(tiny_model_dir, ModelSettings(vae_tiling=tiling))
        calls = []
        vae = model.vae
        original = vae.tiled_decode
        vae.tiled_decode = lambda *a, **k: calls.append(1) or original(*a, **k)
        out = edit(model, image, steps=1, width=384, height=320,
                   output="pil").images[0]
        return np.asarray(out, dtype=np.float64), len(calls)

    plain, plain_calls = run(False)
    tiled, tiled_calls = run(True)
    assert plain_calls == 0 and tiled_calls == 1
    mse = ((plain - tiled) ** 2).mean()
    psnr = 10 * np.log10(255.0**2 / max(mse, 1e-12))
    print(f"VAE tiling PSNR vs untiled: {psnr:.1f} dB")
    assert mse > 0 and psnr >= 25.0
