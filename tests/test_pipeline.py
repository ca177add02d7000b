"""The pipeline's contract beyond parity: loading layouts, offload, callbacks, sizes, warnings, the CLI."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

from firered_core import cli, geometry
from firered_core.model import ModelError, check_model_folder, load_model
from firered_core.pipeline import EditPipeline

from tolerances import sampled_atol  # noqa: E402

SMALL = dict(steps=2, true_cfg=2.0, seed=3, width=64, height=48, vae_area=128 * 128, output="latent")


def test_missing_and_incomplete_folders_are_named(tmp_path, tiny_model_dir):
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "vae")
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelError) as err:
        check_model_folder(broken)
    assert "vae" in str(err.value) and "transformer/ weights" in str(err.value)


def test_sharded_transformer_and_component_folders_load_identically(tmp_path, tiny_model_dir, tiny_model,
                                                                    make_image):
    """A transformer saved in shards with an index, given as its own folder, gives the same result.

    The weights are bit-identical; outputs agree within the bound of tests/tolerances.py for 2 steps (memory layout can
    change CPU kernels' summation order).
    """
    shards = tmp_path / "sharded-transformer"
    tiny_model.transformer.save_pretrained(shards, max_shard_size="200KB")
    assert (shards / "diffusion_pytorch_model.safetensors.index.json").is_file()
    model = load_model(tiny_model_dir, transformer=shards)
    img = [make_image(96, 64)]
    a = EditPipeline(tiny_model).edit(img, "blue", " ", **SMALL).latents
    b = EditPipeline(model).edit(img, "blue", " ", **SMALL).latents
    assert all(torch.equal(v, model.transformer.state_dict()[k]) for k, v in tiny_model.transformer.state_dict().items())
    assert (a - b).abs().max().item() <= sampled_atol(2, scale=4.0)


def test_model_offload_is_lossless(tiny_model_dir, tiny_model, make_image):
    img = [make_image(96, 64)]
    plain = EditPipeline(tiny_model).edit(img, "green", " ", **SMALL).latents
    offloaded = load_model(tiny_model_dir, offload="model")
    got = EditPipeline(offloaded).edit(img, "green", " ", **SMALL).latents
    assert torch.equal(plain, got)
    assert all(next(offloaded.get(n).parameters()).device.type == "cpu" for n in ("transformer", "vae"))


def test_bf16_runs_and_stays_close(tiny_model_dir, make_image):
    img = [make_image(96, 64)]
    fp32 = EditPipeline(load_model(tiny_model_dir)).edit(img, "red", " ", **SMALL).latents
    bf16 = EditPipeline(load_model(tiny_model_dir, dtype="bf16")).edit(img, "red", " ", **SMALL).latents
    assert bf16.dtype == torch.bfloat16
    assert torch.isfinite(bf16.float()).all()
    assert (bf16.float() - fp32).abs().mean() < 0.1


def test_callback_sees_every_step_and_can_interrupt(tiny_model, make_image):
    seen = []
    EditPipeline(tiny_model).edit([make_image(96, 64)], "red", " ", callback=seen.append,
                                  **{**SMALL, "steps": 3})
    assert [s.step for s in seen] == [0, 1, 2] and seen[-1].sigma == 0.0
    assert seen[0].latents.shape == (1, (48 // 16) * (64 // 16), 64)

    class Stop(Exception):
        pass

    def stop(info):
        if info.step == 1:
            raise Stop

    with pytest.raises(Stop):
        EditPipeline(tiny_model).edit([make_image(96, 64)], "red", " ", callback=stop, **{**SMALL, "steps": 3})


def test_reference_order_changes_the_result(tiny_model, make_image):
    """Order is meaningful: image k is frame k of the RoPE and "Picture k" of the prompt."""
    a, b = make_image(96, 64, seed=1), make_image(64, 96, seed=2)
    ab = EditPipeline(tiny_model).edit([a, b], "swap", " ", **SMALL).latents
    ba = EditPipeline(tiny_model).edit([b, a], "swap", " ", **SMALL).latents
    assert not torch.allclose(ab, ba)


def test_more_than_three_references_warn(tiny_model, make_image, caplog):
    imgs = [make_image(64, 64, seed=k) for k in range(4)]
    with caplog.at_level(logging.WARNING):
        out = EditPipeline(tiny_model).edit(imgs, "merge", None, **{**SMALL, "true_cfg": 1.0})
    assert "4 reference images" in caplog.text
    assert out.latents.shape == (1, 12, 64)


def test_sizes():
    assert geometry.calculate_dimensions(384 * 384, 4 / 3) == (448, 320)
    assert geometry.default_output_size((1000, 500)) == (1440, 736)
    assert geometry.default_output_size(None) == (1024, 1024)
    with pytest.raises(ValueError, match="width=100"):
        geometry.check_size(100, 64)


def test_cli_demo_writes_an_image(tmp_path, monkeypatch, tiny_model_dir, make_image):
    monkeypatch.setattr("firered_core.demo_models.default_demo_dir", lambda: tiny_model_dir)
    src = tmp_path / "in.png"
    make_image(80, 48).save(src)
    out = tmp_path / "out.png"
    assert cli.main(["-p", "make it red", "-i", str(src), "--steps", "2", "--width", "64", "--height", "32",
                     "--vae-area", str(64 * 64), "-o", str(out)]) == 0
    from PIL import Image

    assert Image.open(out).size == (64, 32)


@pytest.mark.parametrize("args, message", [
    (["--model", "/definitely/not/here"], "model folder not found: /definitely/not/here"),
    (["--model", "{model}", "-i", "/no/such.png"], "image not found: /no/such.png"),
    (["--model", "{model}", "--width", "100"], "--width 100 is not allowed: output width in pixels must be an "
                                               "integer in 16..8192, a multiple of 16"),
])
def test_cli_errors_are_one_clear_line(args, message, capsys, tiny_model_dir):
    args = [a.replace("{model}", str(tiny_model_dir)) for a in args]
    assert cli.main(["-p", "x", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("firered-edit: error: ") and message in err[-1]
    assert not any("Traceback" in line for line in err)


def test_cli_internal_bug_keeps_its_traceback(monkeypatch):
    """Only bad input (FireRedError, OSError) becomes exit status 2; a bug is not disguised as bad input."""
    def broken(args):
        raise KeyError("internal")

    monkeypatch.setattr(cli, "run", broken)
    with pytest.raises(KeyError, match="internal"):
        cli.main(["-p", "x"])


def test_one_step_schedule_is_finite():
    """diffusers' terminal stretch gives NaN for a one-sigma schedule; ours goes 1 -> 0 in one Euler step."""
    from firered_core.sampling import make_sigmas
    from firered_core.sampling import SCHEDULER_CONFIG

    sigmas = make_sigmas(1, 4096, SCHEDULER_CONFIG)
    assert torch.isfinite(sigmas).all() and sigmas.tolist() == [1.0, 0.0]
    assert torch.isfinite(make_sigmas(1, 4096, SCHEDULER_CONFIG, denoise=0.5)).all()


def test_match_input_size_keeps_the_exact_size_and_position(tiny_model, make_image):
    """An odd-sized input comes back at its exact size: padded to 16, edited, cropped by the recorded padding."""
    from firered_core.geometry import crop_back
    from firered_core.images import pil_to_tensor
    from firered_core.pipeline import pad_image, to_pil

    img = make_image(77, 45, seed=5)
    kw = dict(steps=2, true_cfg=1.0, seed=1, vl_area=128 * 128)
    got = EditPipeline(tiny_model).edit([img], "keep", None, match_input=True, **kw)
    assert got.images[0].size == (77, 45) and (got.width, got.height) == (77, 45)
    padded, record = pad_image(img)
    assert padded.size == (80, 48) and (record.left, record.top) == (1, 1)
    assert torch.equal(crop_back(pil_to_tensor(padded)[None], record)[0], pil_to_tensor(img))
    by_hand = EditPipeline(tiny_model).edit([padded], "keep", None, width=80, height=48, vae_area=80 * 48, **kw)
    expected = to_pil(crop_back(pil_to_tensor(by_hand.images[0])[None], record).permute(0, 3, 1, 2))[0]
    diff = np.asarray(got.images[0], dtype=np.int16) - np.asarray(expected, dtype=np.int16)
    assert np.abs(diff).max() <= 1  # one 8-bit rounding step: the by-hand path rounds to 8 bits before cropping
