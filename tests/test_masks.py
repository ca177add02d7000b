"""Masked edits: outside the mask the input's own pixels (exact, 8-bit) on every path; soft masks give monotone
change; the colour match undoes a planted drift; the mask rules (file reading, resize, feather)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from firered_core import masks as M
from firered_core.conditioning import PromptEmbeds
from firered_core.pipeline import EditPipeline
from firered_core.sampling import make_sigmas, sample, SCHEDULER_CONFIG

FAST = dict(steps=2, true_cfg=2.0, vl_area=56 * 56, vae_area=64 * 64)


def box_mask(width: int, height: int, box=(0.25, 0.2, 0.75, 0.7)) -> torch.Tensor:
    m = torch.zeros(height, width)
    x0, y0, x1, y1 = box
    m[int(y0 * height):int(y1 * height), int(x0 * width):int(x1 * width)] = 1
    return m


def check_confined(result, picture: Image.Image, mask: torch.Tensor) -> None:
    src = np.asarray(picture)
    outside = mask.numpy() == 0
    for out in result.images:
        out = np.asarray(out)
        assert out.shape == src.shape
        np.testing.assert_array_equal(out[outside], src[outside])
        assert (out[~outside] != src[~outside]).mean() > 0.5  # inside, changed


@pytest.mark.parametrize("size,match_input", [((37, 23), True), ((48, 32), True), ((50, 33), True),
                                              ((37, 23), False)])
def test_hard_mask_keeps_every_outside_pixel(tiny_model, make_image, size, match_input):
    picture = make_image(*size, seed=size[0])
    mask = box_mask(*size)
    kwargs = {} if match_input else dict(width=64, height=48)
    result = EditPipeline(tiny_model).edit([picture], "make it red", seed=1, match_input=match_input, mask=mask,
                                           feather=2, **FAST, **kwargs)
    check_confined(result, picture, mask)


def test_mask_with_references_batch_and_seed_sweep(tiny_model, make_image):
    """Three pictures (the last is edited), two prompts x two images each, one seed per image, a mask at another
    size (stretched to the picture)."""
    pictures = [make_image(40, 40, seed=1), make_image(24, 56, seed=2), make_image(45, 29, seed=3)]
    small = box_mask(90, 58)  # twice the size: the resize rule maps it onto the 45x29 picture
    mask = M.resize_mask(small, 45, 29)[0]
    result = EditPipeline(tiny_model).edit(pictures, ["red", "blue"], seed=[5, 6, 7, 8], num_images=2,
                                           match_input=True, mask=small, **FAST)
    assert len(result.images) == 4
    check_confined(result, pictures[-1], mask)
    arrays = [np.asarray(i) for i in result.images]
    assert not np.array_equal(arrays[0], arrays[1])  # the sweep's seeds differ inside the mask


def test_one_mask_per_image_and_a_bad_batch(tiny_model, make_image):
    picture = make_image(32, 32)
    masks = torch.stack([box_mask(32, 32, (0, 0, 0.5, 1)), box_mask(32, 32, (0.5, 0, 1, 1))])
    result = EditPipeline(tiny_model).edit([picture], "x", seed=0, num_images=2, match_input=True, mask=masks,
                                           **FAST)
    for out, m in zip(result.images, masks):
        keep = m.numpy() == 0
        np.testing.assert_array_equal(np.asarray(out)[keep], np.asarray(picture)[keep])
    with pytest.raises(M.MaskError, match="3 masks for 2 images"):
        EditPipeline(tiny_model).edit([picture], "x", num_images=2, mask=torch.zeros(3, 32, 32), **FAST)
    with pytest.raises(M.MaskError, match="needs an image"):
        EditPipeline(tiny_model).edit([], "x", mask=torch.zeros(32, 32), **FAST)


def _planted_flow(m_value: float, steps: int = 12) -> float:
    """Source 0, a model whose flow leads every token to 1 (velocity noise - 1): the change at mask value m."""
    tokens = 8
    source, noise = torch.zeros(1, tokens, 64), torch.randn(1, tokens, 64, generator=torch.Generator().manual_seed(0))
    sigmas = make_sigmas(steps, tokens, SCHEDULER_CONFIG)
    mask = torch.full((1, tokens, 1), m_value)
    hook = M.blend_hook(source, mask)(noise)
    cond = PromptEmbeds(torch.zeros(1, 1, 4), torch.ones(1, 1, dtype=torch.long))
    out = sample(lambda x, t, c, b: noise - 1.0, noise.clone(), sigmas, cond, step_hook=hook)
    return (out - source).mean().item()


def test_soft_mask_is_monotone_and_hard_values_are_exact():
    values = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    change = [_planted_flow(v) for v in values]
    assert change[0] == 0.0  # black follows the source to the end
    assert abs(change[-1] - 1.0) < 1e-5  # white: the model's result
    assert all(b > a for a, b in zip(change, change[1:])), change


def test_soft_mask_through_the_pipeline_changes_more_where_whiter(tiny_model, make_image):
    picture = make_image(64, 32, seed=4)
    mask = torch.zeros(32, 64)
    for k, v in enumerate((0.0, 0.3, 0.7, 1.0)):
        mask[:, 16 * k:16 * (k + 1)] = v
    result = EditPipeline(tiny_model).edit([picture], "x", seed=2, match_input=True, mask=mask,
                                           **{**FAST, "steps": 8})
    diff = np.abs(np.asarray(result.images[0]).astype(float) - np.asarray(picture).astype(float))
    per_band = [diff[:, 16 * k + 3:16 * (k + 1) - 3].mean() for k in range(4)]
    assert per_band[0] == 0.0 and per_band[1] < per_band[2] < per_band[3], per_band


def _drift(truth: torch.Tensor, kind: str) -> torch.Tensor:
    """A planted colour cast: a gain and offset per RGB channel, or on L*, a*, b* in CIE Lab."""
    if kind == "rgb":
        return (truth * torch.tensor([0.85, 0.95, 1.1]) + torch.tensor([0.06, 0.0, -0.04])).clamp(0, 1)
    import kornia

    lab = kornia.color.rgb_to_lab(truth.permute(0, 3, 1, 2))
    lab = lab * torch.tensor([0.9, 1, 1]).view(1, 3, 1, 1) + torch.tensor([5.0, 4, -6]).view(1, 3, 1, 1)
    return kornia.color.lab_to_rgb(lab, clip=True).permute(0, 2, 3, 1)


# Each method undoes the drift of its own model (< 10% left) and reduces the other kind (< 70% left).
@pytest.mark.parametrize("method,kind,left", [("mean-std", "lab", 0.1), ("mean-std", "rgb", 0.7),
                                              ("histogram", "rgb", 0.1), ("histogram", "lab", 0.7)])
def test_color_match_reduces_a_planted_drift(make_image, method, kind, left):
    source = torch.from_numpy(np.asarray(make_image(64, 48, seed=9), dtype=np.float32) / 255)[None]
    mask = box_mask(64, 48)
    truth = source.clone()
    truth[0, 10:30, 20:44] = torch.tensor([0.2, 0.6, 0.3])  # the edit itself
    drifted = _drift(truth, kind)
    matched = M.color_match(drifted, source, mask, method)
    inside = mask.bool()
    before = (drifted - truth)[0][inside].abs().mean()
    after = (matched - truth)[0][inside].abs().mean()
    assert after < left * before, (before, after)
    assert M.color_match(drifted, source, mask, "off") is drifted


def test_feather_ramps_inside_and_never_touches_outside():
    mask = torch.zeros(1, 40, 40)
    mask[0, 10:30, 10:30] = 1
    alpha = M.feather_alpha(mask, 4)
    assert (alpha[mask == 0] == 0).all()
    np.testing.assert_allclose(alpha[0, 20, 10:16].numpy(), [0.25, 0.5, 0.75, 1, 1, 1])
    edited, source = torch.rand(1, 40, 40, 3), torch.rand(1, 40, 40, 3)
    out = M.composite(edited, source, mask, feather=4)
    assert torch.equal(out[0][mask[0] == 0], source[0][mask[0] == 0])
    assert torch.equal(out[0, 20, 20], edited[0, 20, 20])


def test_mask_rules(tmp_path):
    rgba = np.full((10, 20, 4), 255, np.uint8)
    rgba[2:5, 3:9, 3] = 0  # painted in ComfyUI's mask editor = transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "painted.png")
    m = M.load_mask(tmp_path / "painted.png")
    assert m.shape == (1, 10, 20) and m[0, 3, 4] == 1 and m.sum() == 18
    grey = np.zeros((10, 20), np.uint8)
    grey[:, 10:] = 255
    Image.fromarray(grey, "L").save(tmp_path / "white_right.png")
    m = M.load_mask(tmp_path / "white_right.png")
    assert m[0, 0, 15] == 1 and m[0, 0, 5] == 0
    stretched = M.resize_mask(m, 40, 30)
    assert stretched.shape == (1, 30, 40) and stretched[0, :, :19].max() == 0 and stretched[0, :, 21:].min() == 1
    with pytest.raises(M.MaskError, match="nope.png"):
        M.load_mask(tmp_path / "nope.png")
    half = torch.zeros(1, 16, 32)
    half[..., 16:] = 0.5
    tokens = M.token_mask(half)
    assert tokens.shape == (1, 2, 1) and tokens[0, :, 0].tolist() == [0.0, 0.5]


def test_cli_mask_file_keeps_outside_pixels(tiny_model_dir, make_image, tmp_path, capsys):
    from firered_core import cli

    picture = make_image(45, 30, seed=5)
    picture.save(tmp_path / "in.png")
    painted = np.full((15, 22, 4), 255, np.uint8)  # a half-size mask painted in ComfyUI's mask editor
    painted[4:10, 6:16, 3] = 0
    Image.fromarray(painted, "RGBA").save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert cli.main(["--model", str(tiny_model_dir), "-i", str(tmp_path / "in.png"), "-p", "red", "--mask",
                     str(tmp_path / "mask.png"), "--feather", "3", "--color-match", "histogram", "--steps", "2",
                     "--vl-area", str(56 * 56), "--vae-area", str(64 * 64), "--width", "64", "--height", "48",
                     "-o", str(out)]) == 0
    mask = M.resize_mask(M.load_mask(tmp_path / "mask.png"), 45, 30)[0]
    check_confined(type("R", (), {"images": [Image.open(out)]}), picture, mask)
    assert cli.main(["--model", str(tiny_model_dir), "-i", str(tmp_path / "in.png"), "-p", "x", "--mask",
                     str(tmp_path / "nope.png"), "-o", str(out)]) == 2
    assert "nope.png" in capsys.readouterr().err


def test_nodes_pad_mask_and_masked_composite():
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import nodes_support as S
    from firered_core.geometry import pad_record

    classes = S.classes()
    record = pad_record(37, 23)
    (padded,) = classes["FireRedPadMask"]().pad(torch.ones(1, 64, 64), record)  # LoadImage's empty-size mask
    assert padded.shape == (1, record.padded_height, record.padded_width) and padded.min() == 1
    source, edited = torch.rand(1, 23, 37, 3), torch.rand(2, 48, 64, 3)  # another size: resized to the source
    mask = box_mask(37, 23)
    (out,) = classes["FireRedMaskedComposite"]().composite(edited, source, mask[None], 2, "mean-std")
    assert out.shape == (2, 23, 37, 3)
    assert torch.equal(out[:, mask == 0], source.expand(2, -1, -1, -1)[:, mask == 0])
    with pytest.raises(ValueError, match="FireRed Masked Composite: input 'source'"):
        classes["FireRedMaskedComposite"]().composite(edited, torch.rand(3, 23, 37, 3), mask[None], 0, "off")
    with pytest.raises(ValueError, match="input 'mask'.*3 masks for 2 images"):
        classes["FireRedMaskedComposite"]().composite(edited, source, torch.zeros(3, 23, 37), 0, "off")
