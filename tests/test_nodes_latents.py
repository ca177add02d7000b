"""ComfyUI's LATENT convention (raw, 5-D) and the preview estimate used by the sampler node."""

from __future__ import annotations

import pytest
import torch

from firered_core import comfy_latents as CL
from firered_core import latents as L
from firered_core.preview import latent_to_rgb, tokens_to_latent
from firered_core.sampling import noised_start

VAE_CONFIG = {"latents_mean": [0.1 * k for k in range(16)], "latents_std": [1.0 + 0.05 * k for k in range(16)]}


def test_raw_round_trip_and_shapes():
    tokens = torch.randn(2, 6 * 4, 64)
    raw = CL.to_raw(tokens, 64, 96, VAE_CONFIG)
    assert raw.shape == (2, 16, 1, 12, 8) and CL.pixel_size(raw) == (64, 96)
    torch.testing.assert_close(CL.from_raw(raw, VAE_CONFIG), tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(CL.from_raw(raw[:, :, 0], VAE_CONFIG), tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(L.normalize(raw, VAE_CONFIG), L.unpack(tokens, 96, 64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, message", [((1, 4, 8, 8), "channels"), ((1, 16, 3, 8, 8), "frames"),
                                            ((16, 8, 8), "4-D or 5-D")])
def test_check_raw_says_what_is_wrong(shape, message):
    with pytest.raises(ValueError, match=message):
        CL.check_raw(torch.zeros(shape))


def test_noised_start_endpoints():
    init, noise = torch.zeros(1, 4, 64), torch.ones(1, 4, 64)
    assert torch.equal(noised_start(init, noise, 1.0), noise)
    assert torch.equal(noised_start(init, noise, 0.0), init)
    torch.testing.assert_close(noised_start(init, noise, 0.25), torch.full((1, 4, 64), 0.25))


def test_step_denoised_estimate_recovers_clean_image_of_a_straight_flow():
    """With the exact velocity of a straight flow (noise - x0), every step's estimate is x0 itself."""
    from firered_core.conditioning import PromptEmbeds
    from firered_core.sampling import sample

    x0, noise = torch.randn(1, 4, 64), torch.randn(1, 4, 64)
    seen = []
    sample(lambda x, t, c, b: noise - x0, noise, torch.tensor([1.0, 0.7, 0.3, 0.0]),
           PromptEmbeds(torch.zeros(1, 1, 8), None), callback=seen.append)
    assert len(seen) == 3
    for info in seen:
        torch.testing.assert_close(info.denoised, x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen[-1].latents, x0, rtol=1e-5, atol=1e-5)


def test_preview_image_size():
    z = tokens_to_latent(torch.randn(2, 12, 64), 64, 48)
    assert z.shape == (1, 16, 1, 6, 8)
    assert latent_to_rgb(z).size == (8, 6)
    assert latent_to_rgb(z, torch.randn(16, 3), torch.zeros(3)).size == (8, 6)
