"""Single files as ComfyUI users hold them (issue 9, point 1) and the loaders' messages when files are missing
(point 3): the single-file model gives the folder model's pixels (library, CLI, node); ComfyUI's own Qwen2.5
tokenizer gives the prompt template's special-token ids (needs ComfyUI's source: ``FIRERED_COMFYUI_DIR``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
import nodes_support as S  # noqa: E402
from conftest import random_image  # noqa: E402

from firered_core.formats.convert import COMFY_FILE_NAMES, comfy_text_encoder_state, write_comfy_single_files
from firered_core.formats.text_encoder import load_text_encoder_processor, processor_from_tokenizer_dir
from firered_core.processor import QWEN25_VL_IMAGE_PROCESSOR, QWEN25_VL_SPECIAL_TOKENS
from firered_core.model import load_model
from firered_core.pipeline import EditPipeline

COMFY_TOKENIZER = Path(os.environ.get("FIRERED_COMFYUI_DIR", "/nonexistent")) / "comfy/text_encoders/qwen25_tokenizer"
needs_comfy = pytest.mark.skipif(not COMFY_TOKENIZER.is_dir(),
                                 reason="ComfyUI source not found (set FIRERED_COMFYUI_DIR to a ComfyUI checkout)")
EDIT = dict(prompt="make it red", steps=2, seed=3, width=64, height=48, vl_area=56 * 56, vae_area=64 * 64)


def edit(model) -> np.ndarray:
    return np.asarray(EditPipeline(model).edit([random_image(64, 48, seed=5)], **EDIT).images[0])


@pytest.fixture(scope="module")
def comfy_files(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    return write_comfy_single_files(tiny_model_dir, tmp_path_factory.mktemp("comfy-files"))


@pytest.fixture(scope="module")
def folder_pixels(tiny_model_dir) -> np.ndarray:
    return edit(load_model(tiny_model_dir))


def test_files_are_in_comfyui_layouts(comfy_files):
    from safetensors import safe_open

    keys = {kind: set(safe_open(str(p), "pt").keys()) for kind, p in comfy_files.items()}
    assert all(k.startswith("model.diffusion_model.") for k in keys["transformer"])
    assert "decoder.middle.0.residual.0.gamma" in keys["vae"]
    assert "model.embed_tokens.weight" in keys["text_encoder"] and "lm_head.weight" not in keys["text_encoder"]
    assert any(k.startswith("visual.") for k in keys["text_encoder"])


def test_single_files_give_the_folder_pixels(comfy_files, folder_pixels):
    model = load_model(None, **comfy_files)
    np.testing.assert_array_equal(edit(model), folder_pixels)
    assert model.scheduler_config["max_shift"] == 0.9  # the published scheduler, no folder needed


def test_cli_single_files_without_a_model_folder(comfy_files, folder_pixels, tiny_model_dir, tmp_path):
    from firered_core import cli

    Image.fromarray(np.asarray(random_image(64, 48, seed=5))).save(tmp_path / "in.png")
    args = ["-i", str(tmp_path / "in.png"), "-p", EDIT["prompt"], "--steps", "2", "--seed", "3", "--width", "64",
            "--height", "48", "--vl-area", str(56 * 56), "--vae-area", str(64 * 64),
            *[a for kind, p in comfy_files.items() for a in (f"--{kind.replace('_', '-')}", str(p))]]
    for extra, name in (([], "plain"), (["--tokenizer", str(tiny_model_dir / "tokenizer")], "tokenizer")):
        assert cli.main([*args, *extra, "-o", str(tmp_path / f"{name}.png")]) == 0
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / f"{name}.png")), folder_pixels)


def test_tokenizer_folder_gets_the_published_image_processor(tiny_model_dir):
    processor = processor_from_tokenizer_dir(tiny_model_dir / "tokenizer")
    ip = processor.image_processor
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (14, 2, 2)
    assert (ip.size.shortest_edge, ip.size.longest_edge) == (QWEN25_VL_IMAGE_PROCESSOR["min_pixels"],
                                                             QWEN25_VL_IMAGE_PROCESSOR["max_pixels"])
    assert list(ip.image_mean) == QWEN25_VL_IMAGE_PROCESSOR["image_mean"]


@pytest.fixture
def file_dirs(comfy_files, monkeypatch):
    monkeypatch.setenv("FIRERED_SINGLE_FILE_DIRS", str(next(iter(comfy_files.values())).parent))
    return comfy_files


def test_single_file_loader_node_gives_the_folder_pixels(file_dirs, folder_pixels):
    loader = S.classes()["FireRedSingleFileLoader"]
    listed = loader.INPUT_TYPES()["required"]
    assert COMFY_FILE_NAMES["vae"] in listed["vae_name"][0]
    inputs = dict(transformer_name=COMFY_FILE_NAMES["transformer"], text_encoder_name=COMFY_FILE_NAMES["text_encoder"],
                  vae_name=COMFY_FILE_NAMES["vae"], dtype="fp32", device="cpu", offload="none", gguf_mode="runtime")
    S.validate_inputs(loader, inputs)
    model = loader().load(**inputs)[0]
    assert loader().load(**inputs)[0] is model  # shared, like the folder loader
    np.testing.assert_array_equal(edit(model), folder_pixels)


def test_missing_single_file_says_where_to_put_it(file_dirs):
    loader = S.classes()["FireRedSingleFileLoader"]
    inputs = dict(transformer_name="firered_fp8.safetensors", text_encoder_name=COMFY_FILE_NAMES["text_encoder"],
                  vae_name="qwen_image_vae.safetensors", dtype="fp32", device="cpu", offload="none",
                  gguf_mode="runtime")
    with pytest.raises(S.PromptInvalid) as exc:
        S.validate_inputs(loader, inputs)
    msg = str(exc.value)
    assert "'firered_fp8.safetensors' not found" in msg and "models/diffusion_models" in msg
    assert "'qwen_image_vae.safetensors' not found" in msg and "models/vae" in msg
    assert str(file_dirs["vae"].parent) in msg and "text_encoder" not in msg.split("searched")[0]


def test_missing_model_folder_and_lora_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("FIRERED_MODEL_DIRS", str(tmp_path / "firered"))
    monkeypatch.setenv("FIRERED_LORA_DIRS", str(tmp_path / "loras"))
    classes = S.classes()
    with pytest.raises(S.PromptInvalid) as exc:
        S.validate_inputs(classes["FireRedModelLoader"], dict(model_name="FireRed-Image-Edit-1.0", dtype="auto",
                                                              device="auto", offload="none"))
    msg = str(exc.value)
    assert "'FireRed-Image-Edit-1.0' not found" in msg and str(tmp_path / "firered") in msg
    assert "model_index.json" in msg and "no model folder is installed yet" in msg
    assert classes["FireRedLoraLoader"].VALIDATE_INPUTS("lightning.safetensors").startswith(
        "FireRed LoRA Loader: input 'lora_name': LoRA file 'lightning.safetensors' not found (searched: "
        + str(tmp_path / "loras"))


@needs_comfy
def test_comfyui_tokenizer_gives_the_special_token_ids():
    from firered_core.conditioning import EDIT_DROP, build_text

    processor = processor_from_tokenizer_dir(COMFY_TOKENIZER)
    tok = processor.tokenizer
    assert {t: tok.convert_tokens_to_ids(t) for t in QWEN25_VL_SPECIAL_TOKENS} == QWEN25_VL_SPECIAL_TOKENS
    assert (tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|vision_start|>"),
            tok.convert_tokens_to_ids("<|image_pad|>")) == (151644, 151652, 151655)
    text, drop = build_text("make it snow", 1)
    ids = processor(text=[text], images=[Image.new("RGB", (56, 56))], return_tensors="pt").input_ids[0].tolist()
    assert ids[0] == 151644 and ids[-3:] == tok("<|im_start|>assistant\n").input_ids
    # the reference drops the first 64 tokens: exactly the system turn and "<|im_start|>user\n"
    assert drop == EDIT_DROP and tok.decode(ids[drop:]).startswith("Picture 1: <|vision_start|><|image_pad|>")
    assert ids.count(151655) == (56 // 14) ** 2 // 4 and ids.count(151652) == ids.count(151653) == 1


@needs_comfy
def test_single_file_text_encoder_uses_comfyui_tokenizer_when_it_fits(tmp_path, comfy_files):
    """A text encoder with the real vocabulary gets ComfyUI's tokenizer; the tiny one keeps its own (ComfyUI's ids
    would not fit its vocabulary); with neither, the error says how to give one."""
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    from firered_core.demo_models import build_tokenizer, text_encoder_config
    from firered_core.formats import FormatError

    cfg = text_encoder_config("tiny", build_tokenizer())
    cfg.text_config.vocab_size = 152064
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    (tmp_path / "te").mkdir()
    (tmp_path / "te" / "big_vocab.json").write_text(cfg.to_json_string())
    torch.manual_seed(0)
    state = comfy_text_encoder_state(Qwen2_5_VLForConditionalGeneration(cfg).to(torch.bfloat16).state_dict())
    path = tmp_path / "te" / "big_vocab.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    got = load_text_encoder_processor(path, default_tokenizer=COMFY_TOKENIZER)
    assert got.tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655
    tiny = load_text_encoder_processor(comfy_files["text_encoder"], default_tokenizer=COMFY_TOKENIZER)
    assert tiny.tokenizer.convert_tokens_to_ids("<|image_pad|>") < 400
    with pytest.raises(FormatError, match="--tokenizer"):
        load_text_encoder_processor(path)
