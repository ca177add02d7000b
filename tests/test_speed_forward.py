"""The block-level transformer forward equals diffusers' forward; the block cache skips blocks only when allowed."""

from __future__ import annotations

import pytest
import torch
from diffusers import QwenImageTransformer2DModel

from firered_core.block_cache import BlockCache, BlockCacheConfig
from firered_core.speed import RunSettings
from firered_core.demo_models import transformer_config
from firered_core.transformer_forward import run_transformer

from speed_helpers import edit, fresh_model, max_diff, rel_err


def make_inputs(batch: int = 2):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 32, 64, generator=gen)
    e = torch.randn(batch, 7, 64, generator=gen)
    mask = torch.ones(batch, 7, dtype=torch.long)
    mask[-1, 5:] = 0
    return x, e, mask, torch.full((batch,), 0.7), [[(1, 4, 4), (1, 4, 4)]] * batch


@pytest.mark.parametrize("zero_cond_t", [False, True])
def test_block_forward_equals_diffusers(zero_cond_t):
    torch.manual_seed(0)
    tr = QwenImageTransformer2DModel(**{**transformer_config("tiny"), "num_layers": 4,
                                        "zero_cond_t": zero_cond_t}).eval()
    x, e, mask, t, shapes = make_inputs()
    with torch.no_grad():
        ref = tr(hidden_states=x, encoder_hidden_states=e, encoder_hidden_states_mask=mask, timestep=t,
                 img_shapes=shapes, return_dict=False)[0]
        ours = run_transformer(tr, x, e, mask, t, shapes)
        cache = BlockCache(BlockCacheConfig(threshold=0))
        cached = run_transformer(tr, x, e, mask, t, shapes, block_loop=cache.loop("cond"))
    assert torch.equal(ref, ours)
    assert torch.equal(ref, cached)
    assert cache.report()["computed"] == 4


def test_cache_threshold_zero_runs_every_block_and_is_exact(tiny_model_dir, make_image):
    image = make_image(64, 48)
    plain = edit(fresh_model(tiny_model_dir), image, steps=4)
    settings = RunSettings(cache_threshold=1e-9, cache_warmup=0)
    zero = edit(fresh_model(tiny_model_dir), image, RunSettings(cache_threshold=0.0), steps=4)
    assert zero.stats is None and torch.equal(zero.latents, plain.latents)
    tiny = edit(fresh_model(tiny_model_dir), image, settings, steps=4)
    report = tiny.stats["block_cache"]
    assert report["computed"] == report["total"] == 4 * 2 * 2
    assert max_diff(tiny.latents, plain.latents) < 1e-5


@pytest.mark.parametrize("taylorseer", [False, True])
def test_cache_skips_blocks_within_bound(tiny_model_dir, make_image, taylorseer):
    image = make_image(64, 48)
    model_dir = tiny_model_dir
    plain = edit(fresh_model(model_dir), image, steps=8)
    settings = RunSettings(cache_threshold=10.0, cache_first=1, cache_last=0, cache_warmup=2,
                           cache_max_consecutive=2, taylorseer=taylorseer)
    cached = edit(fresh_model(model_dir), image, settings, steps=8)
    report = cached.stats["block_cache"]
    err = rel_err(cached.latents, plain.latents)
    print(f"block cache taylorseer={taylorseer}: {report['computed']}/{report['total']} blocks, "
          f"relative latent error {err:.4f}")
    assert report["computed"] < report["total"]
    for name in ("cond", "uncond"):
        branch = report["branches"][name]
        assert branch["steps"] == 8 and branch["cached_steps"] == 4  # steps 2,3 / 5,6 skipped after warm-up
    assert err < 0.25


def test_cache_state_is_per_branch():
    cache = BlockCache(BlockCacheConfig(threshold=1.0, warmup=0))
    blocks = torch.nn.ModuleList([torch.nn.Identity()] * 3)

    def call(block, h, e):
        return e, h + 1

    h, e = torch.ones(1, 2, 3), torch.ones(1, 1, 3)
    cache.loop("cond")(blocks, h, e, call)
    cache.loop("uncond")(blocks, h, e, call)
    assert cache.report()["branches"]["uncond"]["cached_steps"] == 0
    cache.loop("cond")(blocks, h, e, call)
    assert cache.report()["branches"]["cond"]["cached_steps"] == 1


def test_cudagraph_output_copies_wrap_once_and_leave_no_attribute():
    """With CUDA graphs each block's compiled call is wrapped to copy its outputs; a second compile of the same
    blocks must not wrap the wrapper (one copy per output, not two), and the call carries no private attribute."""
    from firered_core.speed import _clone_outputs

    calls = []

    def compiled(x):
        calls.append(x)
        return (x * 2,)

    block = torch.nn.Linear(1, 1)
    block._compiled_call_impl = compiled
    _clone_outputs(block)
    wrapper = block._compiled_call_impl
    _clone_outputs(block)
    assert block._compiled_call_impl is wrapper and wrapper is not compiled
    assert not [a for a in vars(wrapper) if a.startswith("_firered")]
    x = torch.ones(2)
    (out,) = wrapper(x)
    assert calls == [x] and torch.equal(out, x * 2)
