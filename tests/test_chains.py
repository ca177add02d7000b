"""Edit chains (``chains.edit_chain``, ``firered-edit --then``): pixels outside the union of all rounds' regions are
the original's, bit for bit, after 8 planted rounds and after 3 real sampler rounds on the tiny model; each round
after the first reuses the previous round's latent instead of a VAE encode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from firered_core import chains as C
from firered_core import pipeline as PL
from firered_core.evaluation import planted_edits as P
from firered_core.evaluation.planted_edits import PlantedEditor
from firered_core.images import pil_to_tensor, tensor_to_pil

FAST = dict(steps=2, true_cfg=1.0, vl_area=56 * 56)


def test_eight_planted_rounds_keep_everything_outside_their_union():
    src, other = P.photo("coffee", 96), P.photo("rocket", 96)
    original = tensor_to_pil(src)
    chain = C.edit_chain(PlantedEditor(other), [original], [f"edit {k}" for k in range(8)], seed=100)
    assert len(chain.rounds) == 8 and len(chain.masks) == 8
    union = chain.union.numpy()
    final, start = np.asarray(chain.image), np.asarray(original)
    np.testing.assert_array_equal(final[~union], start[~union])
    assert 0.1 < union.mean() < 0.6  # eight ~3 % blobs at different places
    naive = C.edit_chain(PlantedEditor(other), [original], [f"edit {k}" for k in range(8)], seed=100,
                         preserve="off")
    diff = np.abs(np.asarray(naive.image).astype(int) - start.astype(int))[~union]
    assert diff.mean() > 3  # without preserve the untouched region drifts (benchmarks/edit_chain.py: PSNR)


def test_chain_refuses_a_mask_and_several_images():
    with pytest.raises(C.InputError, match="mask"):
        C.edit_chain(PlantedEditor(None), [Image.new("RGB", (8, 8))], ["a"], mask=torch.ones(8, 8))
    with pytest.raises(C.InputError, match="image"):
        C.edit_chain(PlantedEditor(None), [], ["a"])


def test_three_real_sampler_rounds_keep_the_untouched_region_exact(tiny_model, monkeypatch):
    """The real pipeline (sampler, VAE decode, preserve auto, latent reuse) with a mask-shaped test double at the
    decode stage: round k's decoded picture is the round's input everywhere (plus a colour drift and noise, as a
    real model returns it) except inside blob k, where it is the tiny model's real decoded output."""
    src = P.photo("astronaut", 96)  # 96 x 96: a multiple of 16, so the exact-size path pads nothing
    original = tensor_to_pil(src)
    gen = torch.Generator().manual_seed(0)
    blobs = [P.blob(96, 96, 0.05, np.random.default_rng(k)) for k in range(3)]
    seen, encodes = {}, []
    real_prepare, real_decode, real_encode = PL.prepare_references, PL.decode_to_pixels, PL.encode_references

    def spy_prepare(images, *args, **kwargs):
        seen["input"] = pil_to_tensor(images[-1])
        return real_prepare(images, *args, **kwargs)

    def spy_encode(*args, **kwargs):
        encodes.append(1)
        return real_encode(*args, **kwargs)

    def double(model, tokens, width, height):
        real = real_decode(model, tokens, width, height)[0].permute(1, 2, 0)
        k = len(seen.setdefault("rounds", []))
        seen["rounds"].append(k)
        x = seen["input"]
        noise = 0.01 * torch.randn(x.shape, generator=gen)
        out = (1.03 * x - 0.01 + noise).clamp(0, 1)
        inside = blobs[k][..., None]
        out = torch.where(inside, (0.5 * real + 0.5 * (1 - x)).clamp(0, 1), out)
        return out.permute(2, 0, 1)[None]

    monkeypatch.setattr(PL, "prepare_references", spy_prepare)
    monkeypatch.setattr(PL, "decode_to_pixels", double)
    monkeypatch.setattr(PL, "encode_references", spy_encode)
    chain = C.edit_chain(PL.EditPipeline(tiny_model), [original], ["a", "b", "c"], match_input=True, **FAST)
    assert seen["rounds"] == [0, 1, 2]
    assert chain.reused == 2 and len(encodes) == 1  # rounds 2 and 3 took the previous latent: no VAE encode
    union = chain.union.numpy()
    planted = torch.stack(blobs).any(0).numpy()
    final, start = np.asarray(chain.image), np.asarray(original)
    np.testing.assert_array_equal(final[~union], start[~union])
    assert (union & planted).sum() / (union | planted).sum() > 0.8
    assert (final[planted] != start[planted]).any(-1).mean() > 0.9


def test_cli_chain_writes_rounds_and_mask(tiny_model_dir, tmp_path, capsys):
    from firered_core import cli

    Image.fromarray((np.random.RandomState(0).rand(32, 48, 3) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    rc = cli.main(["--model", str(tiny_model_dir), "-i", str(tmp_path / "in.png"), "-p", "red", "--then", "blue",
                   "--preserve", "auto", "--match-input-size", "--steps", "1", "--true-cfg", "1", "--vl-area",
                   "3136", "-o", str(out)])
    assert rc == 0
    assert Image.open(out).size == (48, 32) and Image.open(tmp_path / "out_round1.png").size == (48, 32)
    assert Image.open(tmp_path / "out_mask.png").mode == "L"
    err = capsys.readouterr().err
    assert "round 2: preserve auto" in err and "1 reused the previous round's latent" in err
    rc = cli.main(["--model", str(tiny_model_dir), "-i", str(tmp_path / "in.png"), "-p", "red", "--then", "blue",
                   "--num-images", "2", "-o", str(out)])
    assert rc == 2 and "error: --then" in capsys.readouterr().err


def test_pipeline_refuses_preserve_with_a_mask_or_a_bad_mode(tiny_model):
    picture = tensor_to_pil(P.photo("coins", 32))
    pipe = PL.EditPipeline(tiny_model)
    with pytest.raises(PL.InputError, match="preserve"):
        pipe.edit([picture], "x", preserve="auto", mask=torch.ones(32, 32), **FAST)
    with pytest.raises(PL.InputError, match="preserve 'on'"):
        pipe.edit([picture], "x", preserve="on", **FAST)
