"""Parity with diffusers' QwenImageEditPlusPipeline (FireRed's official inference) on the tiny model.

Tolerance: final latents within 1e-5 max-abs in fp32 (in practice they are bit-identical); input ids equal;
prompt embeddings within 1e-6.
"""

from __future__ import annotations

import pytest
import torch

from firered_core import conditioning, references
from firered_core.pipeline import EditPipeline, make_noise

TOL = 1e-5
SMALL_VAE = 256 * 256


@pytest.fixture(scope="module")
def ref_pipe(tiny_model_dir):
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def small_vae_area(monkeypatch):
    """Run the reference at a small VAE area (its module constant) so the tests stay fast."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as mod

    monkeypatch.setattr(mod, "VAE_IMAGE_SIZE", SMALL_VAE)
    return SMALL_VAE


def capture_input_ids(module):
    seen = []
    handle = module.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()),
                                              with_kwargs=True)
    return seen, handle


def run_reference(pipe, images, prompt, seed, **kw):
    kw.setdefault("num_inference_steps", 3)
    gen = torch.Generator().manual_seed(seed)
    return pipe(image=images, prompt=prompt, generator=gen, output_type="latent", **kw).images


SIZES = {1: [(128, 96)], 2: [(128, 96), (80, 160)], 3: [(128, 96), (80, 160), (112, 112)]}


@pytest.mark.parametrize("n_refs", [1, 2, 3])
def test_edit_matches_reference(n_refs, ref_pipe, tiny_model, make_image, small_vae_area):
    images = [make_image(w, h, seed=k) for k, (w, h) in enumerate(SIZES[n_refs])]
    ids, handle = capture_input_ids(ref_pipe.text_encoder)
    try:
        expected = run_reference(ref_pipe, images, "put a red hat on Picture 1", seed=7, negative_prompt=" ",
                                 true_cfg_scale=4.0, height=64, width=96)
    finally:
        handle.remove()
    ours = EditPipeline(tiny_model)
    refs = references.prepare_references(images, vae_area=small_vae_area)
    our_inputs, _ = conditioning.tokenize(tiny_model.processor, ["put a red hat on Picture 1"], refs.vl_images)
    assert torch.equal(our_inputs["input_ids"], ids[0])
    got = ours.edit(images, "put a red hat on Picture 1", " ", steps=3, true_cfg=4.0, seed=7, width=96,
                    height=64, vae_area=small_vae_area, output="latent").latents
    assert got.shape == expected.shape == (1, (64 // 16) * (96 // 16), 64)
    assert (got - expected).abs().max().item() <= TOL


def test_prompt_embeddings_match_reference(ref_pipe, tiny_model, make_image):
    images = [make_image(128, 96, 0), make_image(80, 160, 1)]
    refs = references.prepare_references(images)
    exp_embeds, exp_mask = ref_pipe.encode_prompt(["turn the sky purple"], image=refs.vl_images, device="cpu")
    got = conditioning.encode_prompts(tiny_model.text_encoder, tiny_model.processor, ["turn the sky purple"],
                                      refs.vl_images)
    assert exp_mask is None and got.mask is None
    assert got.embeds.shape == exp_embeds.shape
    assert (got.embeds - exp_embeds).abs().max().item() <= 1e-6


def test_default_sizes_match_reference(ref_pipe, tiny_model, make_image):
    """Default VL / VAE areas and the default output size (1 MP at the last image's aspect) as the reference."""
    images = [make_image(200, 120, seed=3)]
    expected = run_reference(ref_pipe, images, "make it snow", seed=1, negative_prompt=" ", true_cfg_scale=4.0,
                             num_inference_steps=2)
    got = EditPipeline(tiny_model).edit(images, "make it snow", " ", steps=2, true_cfg=4.0, seed=1, output="latent")
    assert (got.width, got.height) == (1312, 800)
    assert got.latents.shape == expected.shape
    assert (got.latents - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("seed", [0, 123, 2**31 - 1])
def test_cfg_off_and_seeds(seed, ref_pipe, tiny_model, make_image, small_vae_area):
    images = [make_image(96, 128, seed=seed % 5)]
    expected = run_reference(ref_pipe, images, "remove the background", seed=seed, true_cfg_scale=1.0,
                             height=80, width=64)
    got = EditPipeline(tiny_model).edit(images, "remove the background", None, steps=3, true_cfg=1.0, seed=seed,
                                        width=64, height=80, vae_area=small_vae_area, output="latent").latents
    assert (got - expected).abs().max().item() <= TOL


def test_several_images_per_prompt(ref_pipe, tiny_model, make_image, small_vae_area):
    images = [make_image(128, 96, seed=4)]
    expected = run_reference(ref_pipe, images, "add a moon", seed=5, negative_prompt=" ", true_cfg_scale=3.0,
                             num_images_per_prompt=2, height=64, width=64)
    got = EditPipeline(tiny_model).edit(images, "add a moon", " ", steps=3, true_cfg=3.0, seed=5, width=64,
                                        height=64, num_images=2, vae_area=small_vae_area, output="latent").latents
    assert got.shape[0] == 2
    assert not torch.equal(got[0], got[1])
    assert (got - expected).abs().max().item() <= TOL


def test_batch_of_two_prompts_matches_per_prompt_reference(ref_pipe, tiny_model, make_image, small_vae_area):
    """Prompts of different lengths in one batch (padded, masked) equal one reference run per prompt.

    The reference refuses batches > 1, so each of its runs is given our noise for that sample.
    """
    images = [make_image(128, 96, seed=2)]
    prompts = ["make it red", "replace the cat with a small dog wearing a bright yellow raincoat"]
    got = EditPipeline(tiny_model).edit(images, prompts, " ", steps=3, true_cfg=4.0, seed=[11, 12], width=64,
                                        height=64, vae_area=small_vae_area, output="latent").latents
    noise = make_noise(2, 64, 64, [11, 12], torch.float32, "cpu")
    for i, prompt in enumerate(prompts):
        expected = ref_pipe(image=images, prompt=prompt, negative_prompt=" ", true_cfg_scale=4.0, height=64,
                            width=64, num_inference_steps=3, latents=noise[i:i + 1], output_type="latent").images
        assert (got[i:i + 1] - expected).abs().max().item() <= TOL


def test_text_to_image_matches_qwen_image_pipeline(tiny_model_dir, tiny_model):
    """With no image, the T2I template (34-token drop) is the one of diffusers' QwenImagePipeline."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt="a red fox in snow", negative_prompt=" ", true_cfg_scale=4.0, height=64, width=96,
                    num_inference_steps=3, generator=torch.Generator().manual_seed(3), output_type="latent").images
    got = EditPipeline(tiny_model).edit([], "a red fox in snow", " ", steps=3, true_cfg=4.0, seed=3, width=96,
                                        height=64, output="latent").latents
    assert (got - expected).abs().max().item() <= TOL


def test_decoded_image_matches_reference(ref_pipe, tiny_model, make_image, small_vae_area):
    import numpy as np

    images = [make_image(128, 96, seed=9)]
    gen = torch.Generator().manual_seed(2)
    expected = ref_pipe(image=images, prompt="sepia", negative_prompt=" ", true_cfg_scale=2.0, height=64, width=96,
                        num_inference_steps=2, generator=gen, output_type="pil").images[0]
    got = EditPipeline(tiny_model).edit(images, "sepia", " ", steps=2, true_cfg=2.0, seed=2, width=96, height=64,
                                        vae_area=small_vae_area).images[0]
    assert got.size == expected.size == (96, 64)
    assert np.array_equal(np.asarray(got), np.asarray(expected))
