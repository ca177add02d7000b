"""``firered-edit`` with single-file components and LoRAs: the same image as the folder model, coverage printed, and
LoRA / format problems as one clear line with exit status 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from firered_core import cli
from firered_core.formats import convert_diffusers_vae_state
from firered_core.lora import LoraWeights, lora_state_dict

FAST = ["-p", "make it red", "--width", "64", "--height", "48", "--vae-area", "16384", "--vl-area", "12544",
        "--steps", "2"]
TARGETS = ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.img_mlp.net.2", "proj_out")


@pytest.fixture(scope="module")
def files(tiny_model_dir, tmp_path_factory):
    """The tiny model's transformer as a ComfyUI-prefixed file, its VAE in ComfyUI Wan names, an input image."""
    out = tmp_path_factory.mktemp("cli-files")
    transformer = load_file(str(next((tiny_model_dir / "transformer").glob("*.safetensors"))))
    save_file({f"model.diffusion_model.{k}": v for k, v in transformer.items()}, str(out / "t.safetensors"))
    vae = load_file(str(next((tiny_model_dir / "vae").glob("*.safetensors"))))
    save_file({k: v.contiguous() for k, v in convert_diffusers_vae_state(vae).items()}, str(out / "vae.safetensors"))
    rs = np.random.RandomState(0)
    Image.fromarray((rs.rand(48, 64, 3) * 255).astype(np.uint8)).save(out / "in.png")
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for m in TARGETS:
        out_f, in_f = transformer[f"{m}.weight"].shape
        weights[m] = LoraWeights(torch.randn(4, in_f, generator=gen) * 0.1, torch.randn(out_f, 4, generator=gen) * 0.1,
                                 2.0)
    save_file(lora_state_dict(weights, "comfy"), str(out / "good.safetensors"))
    bad = lora_state_dict(weights, "comfy")
    bad["diffusion_model.proj_outt.lora_down.weight"] = bad.pop("diffusion_model.proj_out.lora_down.weight")
    save_file(bad, str(out / "renamed.safetensors"))
    return out


def edit(files, tmp_path, name: str, *extra: str) -> tuple[int, np.ndarray | None]:
    out = tmp_path / f"{name}.png"
    rc = cli.main([*FAST, "-i", str(files / "in.png"), "-o", str(out), *extra])
    return rc, (np.asarray(Image.open(out)) if rc == 0 else None)


@pytest.fixture(scope="module")
def folder_image(files, tiny_model_dir, tmp_path_factory) -> np.ndarray:
    rc, image = edit(files, tmp_path_factory.mktemp("folder"), "folder", "--model", str(tiny_model_dir))
    assert rc == 0
    return image


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("firered-edit: error:")]


def test_single_file_transformer_and_vae_give_the_folder_image(files, folder_image, tiny_model_dir, tmp_path):
    rc, single = edit(files, tmp_path, "single", "--model", str(tiny_model_dir), "--transformer",
                      str(files / "t.safetensors"), "--vae", str(files / "vae.safetensors"))
    # Same weights, config and rope tables, but not the same memory: the folder is loaded by diffusers as it loads it
    # (weights memory-mapped at the file's 8-byte offsets, kept so the folder path stays bit-identical to the diffusers
    # reference), the single file's weights are copied to 64-byte boundaries (formats.dequant). CPU matmuls take other
    # SIMD paths for unaligned weights (last-ulp differences, checked: aligning the folder's weights makes the images
    # equal), so a pixel may move by 1/255 where a value sits on a rounding edge. Any real difference (a weight, the
    # config, the prefix) changes far more than that.
    assert rc == 0 and folder_image.shape == single.shape
    diff = np.abs(folder_image.astype(np.int16) - single.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.02, (diff.max(), (diff > 0).mean())


def test_good_lora_prints_its_coverage(files, tiny_model_dir, tmp_path, capsys):
    rc, _ = edit(files, tmp_path, "lora", "--model", str(tiny_model_dir), "--lora",
                 f"{files / 'good.safetensors'}:0.5", "--lora-mode", "adapter")
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "LoRA mode: adapter" in err
    assert "LoRA good.safetensors (strength 0.5, comfy keys): 9/9 keys matched, 3 modules touched" in err


def test_lora_with_a_renamed_key_is_one_line_naming_it(files, tiny_model_dir, tmp_path, capsys):
    rc, _ = edit(files, tmp_path, "bad", "--model", str(tiny_model_dir), "--lora", str(files / "renamed.safetensors"))
    err = error_lines(capsys)
    assert rc == 2 and len(err) == 1
    assert "renamed.safetensors" in err[0] and "diffusion_model.proj_outt.lora_down.weight" in err[0]
    assert "--allow-partial-lora" in err[0]


def test_format_error_is_one_line(files, tiny_model_dir, tmp_path, capsys):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes((files / "t.safetensors").read_bytes()[:-1000])
    rc, _ = edit(files, tmp_path, "broken", "--model", str(tiny_model_dir), "--transformer", str(broken))
    err = error_lines(capsys)
    assert rc == 2 and len(err) == 1 and str(broken) in err[0] and "truncated" in err[0]


def test_lora_on_runtime_gguf_defaults_to_adapter(files, tiny_model_dir, tmp_path, capsys):
    from firered_core.formats.gguf import write_gguf

    path = write_gguf(load_file(str(files / "t.safetensors")), tmp_path / "t.gguf", "Q8_0")
    lora = ["--lora", str(files / "good.safetensors")]
    rc, _ = edit(files, tmp_path, "gguf", "--model", str(tiny_model_dir), "--transformer", str(path), *lora)
    err = capsys.readouterr().err
    assert rc == 0 and "LoRA mode: adapter" in err and "9/9 keys matched" in err
    rc, _ = edit(files, tmp_path, "merge", "--model", str(tiny_model_dir), "--transformer", str(path), *lora,
                 "--lora-mode", "merge")
    err = error_lines(capsys)
    assert rc == 2 and len(err) == 1
    assert "cannot merge into 3 GGUF-quantised layers" in err[0] and "--lora-mode adapter" in err[0]
