"""Lossless options give the plain path's result within fp32 tolerance: batched CFG, offload, block swap,
the embedding cache (which must also skip the VL encoder the second time) and compiled blocks."""

from __future__ import annotations

import pytest
import torch

from firered_core.cfg import BatchedCFG, stack_prompts
from firered_core.conditioning import PromptEmbeds
from firered_core.embed_cache import EmbedCache, load_embeds
from firered_core.pipeline import EditPipeline, encode_instructions
from firered_core.speed import ModelSettings, RunSettings

from speed_helpers import EDIT, PROMPT, edit, fresh_model, max_diff
from tolerances import sampled_atol

# 3 steps on latents of size <= 4 (unit-variance noise), each forward summed in another order (tests/tolerances.py)
TOL = sampled_atol(3, scale=4.0)
NO_CACHE = ModelSettings(embed_cache=False)


@pytest.fixture(scope="module")
def image():
    from conftest import random_image

    return random_image(64, 48)


@pytest.fixture(scope="module")
def plain(tiny_model_dir, image):
    return edit(fresh_model(tiny_model_dir, NO_CACHE), image).latents


def count_calls(module):
    calls = []
    module.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


def test_batched_cfg_matches_two_passes(tiny_model_dir, image, plain):
    out = edit(fresh_model(tiny_model_dir), image, RunSettings(batched_cfg=True))
    assert max_diff(out.latents, plain) < TOL


def test_stack_prompts_pads_and_masks():
    a = PromptEmbeds(torch.ones(1, 5, 4), None)
    b = PromptEmbeds(torch.ones(1, 3, 4), None)
    both = stack_prompts(a, b)
    assert both.embeds.shape == (2, 5, 4)
    assert both.mask.tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert float(both.embeds[1, 3:].abs().sum()) == 0
    assert stack_prompts(a, a).mask is None


def test_batched_cfg_falls_back_on_out_of_memory():
    seen = []

    def denoiser(x, t, cond, branch):
        seen.append(branch)
        if branch == "cfg":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return x + (1 if branch == "cond" else 0)

    both = BatchedCFG(PromptEmbeds(torch.ones(1, 2, 4), None), PromptEmbeds(torch.ones(1, 3, 4), None))
    x, t = torch.zeros(1, 4, 64), torch.ones(1)
    cond, uncond = both(denoiser, x, t)
    both(denoiser, x, t)
    assert seen == ["cfg", "cond", "uncond", "cond", "uncond"]
    assert float(cond.mean()) == 1 and float(uncond.mean()) == 0


def test_model_offload_matches(tiny_model_dir, image, plain):
    out = edit(fresh_model(tiny_model_dir, NO_CACHE, offload="model"), image)
    assert max_diff(out.latents, plain) < TOL


@pytest.mark.parametrize("resident", [0, 1])
def test_block_swap_matches(tiny_model_dir, image, plain, resident):
    model = fresh_model(tiny_model_dir, ModelSettings(block_swap=resident, embed_cache=False), offload="model")
    out = edit(model, image)
    if resident == 0:
        from firered_core.memory import BlockSwap

        swap = BlockSwap(model.transformer, 0, "cpu")
        out = edit(model, image)
        assert len(swap.host) == len(model.transformer.transformer_blocks)
        swap.remove()
    assert max_diff(out.latents, plain) < TOL


def test_embedding_cache_skips_encoder_and_matches(tiny_model_dir, image, plain, tmp_path):
    settings = ModelSettings(embed_cache_dir=str(tmp_path / "embeds"))
    model = fresh_model(tiny_model_dir, settings)
    calls = count_calls(model.text_encoder)
    pipe = EditPipeline(model)
    first = pipe.edit([image], PROMPT, steps=3, **EDIT).latents
    after_first = len(calls)
    second = pipe.edit([image], PROMPT, steps=3, **EDIT).latents
    assert after_first == 2 and len(calls) == 2  # prompt + negative once, then never again
    assert max_diff(first, plain) < TOL and torch.equal(first, second)
    files = sorted((tmp_path / "embeds").rglob("*.safetensors"))
    assert len(files) == 2 and load_embeds(files[0]).ndim == 2

    from firered_core import speed

    speed._disk_caches.clear()  # a new process: only the disk folder is shared
    other = fresh_model(tiny_model_dir, settings)
    other_calls = count_calls(other.text_encoder)
    third = EditPipeline(other).edit([image], PROMPT, steps=3, **EDIT).latents
    assert len(other_calls) == 0 and torch.equal(third, first)


def test_embedding_cache_key_changes_with_prompt_and_image(tiny_model_dir, image):
    from conftest import random_image

    model = fresh_model(tiny_model_dir, NO_CACHE)
    cache, fingerprint = EmbedCache(), model.prompt_fingerprint()
    from firered_core.references import prepare_references

    refs = prepare_references([image], 128 * 128, 128 * 128)
    refs2 = prepare_references([random_image(64, 48, seed=5)], 128 * 128, 128 * 128)
    for prompts, r in [(["a"], refs), (["a"], refs), (["b"], refs), (["a"], refs2), (["a", "b"], refs)]:
        cache.encode(lambda todo, r=r: encode_instructions(model, todo, r).pieces(), fingerprint, prompts,
                     r.vl_images, "pipeline")
    assert (cache.misses, cache.hits) == (3, 3)
    direct = encode_instructions(model, ["a", "b"], refs)
    again = cache.encode(None, fingerprint, ["a", "b"], refs.vl_images, "pipeline")
    assert torch.equal(direct.embeds, again.embeds)
    assert (direct.mask is None) == (again.mask is None)
