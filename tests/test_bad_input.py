"""Bad input never gives a black image, a traceback or a hang: one planted defect per class of the reliability
issue, across the CLI, the nodes, the formats and LoRAs; each asserts the exception type (or exit code 2) and that
the message names the culprit."""

from __future__ import annotations

import json
import os
import struct
import sys
import threading

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
import nodes_support as S  # noqa: E402
from test_lora import make_weights, transformer  # noqa: E402,F401
from test_nodes import lora_dir, model, model_dirs, single_file_dir  # noqa: E402,F401

from firered_core import cli  # noqa: E402
from firered_core.errors import FireRedError  # noqa: E402
from firered_core.lora import LoraError, LoraSpec, apply_loras, linear_modules, lora_state_dict, save_lora  # noqa: E402
from firered_core.limits import OptionError  # noqa: E402


SPEED = dict(batched_cfg=False, block_cache=True, cache_threshold=0.08, cache_first=1, cache_last=1, cache_warmup=2,
             cache_max_consecutive=3, taylorseer=False, quantize="none", quantize_text_encoder="none", compile="none",
             fp8_mode="load", attention="sdpa", block_swap=0, vae_tiling=False, embed_cache=True, embed_cache_dir="")


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = cli.main(["-p", "x", *args])
    return code, capsys.readouterr().err.strip().splitlines()[-1]


# -- numbers: every numeric option has a stated range; nothing is silently replaced ------------------------------
@pytest.mark.parametrize("args, culprit", [
    (["--steps", "0"], "--steps 0 is not allowed: sampling steps must be an integer in 1..1000"),
    (["--true-cfg", "inf"], "--true-cfg inf"),
    (["--true-cfg", "nan"], "--true-cfg nan"),
    (["--num-images", "0"], "--num-images 0"),
    (["--num-images", "-3"], "--num-images -3"),
    (["--seed", str(2**64)], f"--seed {2**64} is not allowed: random seed must be an integer in 0..{2**64 - 1}"),
    (["--vae-area", "-5"], "--vae-area -5.0 is not allowed: pixel area of the references for the VAE must be a "
                           "number in 1024..16777216"),
    (["--vl-area", "0"], "--vl-area 0"),
    (["--width", "100000", "--height", "64"], "223.5 GiB"),
    (["--width", "100"], "--width 100 is not allowed"),
    (["--shift", "-1"], "--shift -1.0"),
    (["--cache-threshold", "-0.5"], "--cache-threshold -0.5"),
    (["--block-swap", "-1"], "--block-swap -1"),
    (["--lora", "x.safetensors:1e30"], "--lora x.safetensors:1e30: strength 1e+30 is not allowed"),
])
def test_cli_numbers_out_of_range_exit_2_naming_the_option(args, culprit, capsys):
    # --model points nowhere: the options must be refused before any model is looked at
    code, line = run_cli(["--model", "/no/such/model", *args], capsys)
    assert code == 2 and line.startswith("firered-edit: error: ") and culprit in line, line


@pytest.mark.parametrize("output, culprit", [
    ("{tmp}", "is an existing folder"),
    ("{tmp}/file.txt/out.png", "file.txt is a file, not a folder"),
    ("{tmp}/out.xyz", "unknown image file extension '.xyz'"),
    ("{tmp}/noext", "unknown image file extension '(none)'"),
])
def test_cli_output_path_is_checked_before_the_model_is_loaded(output, culprit, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    code, line = run_cli(["--model", "/no/such/model", "-o", output.format(tmp=tmp_path)], capsys)
    assert code == 2 and culprit in line and "model folder" not in line, line


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_cli_output_without_permission(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, line = run_cli(["--model", "/no/such/model", "-o", str(locked / "out.png")], capsys)
    assert code == 2 and "no permission to write" in line


@pytest.mark.parametrize("node, kwargs, culprit", [
    ("FireRedImageSize", dict(mode="megapixels", megapixels=0.0, width=64, height=64), "input 'megapixels': 0.0"),
    ("FireRedImageSize", dict(mode="width x height", megapixels=1.0, width=100000, height=64),
     "input 'width': 100000"),
    ("FireRedStitchImages", dict(image1=torch.rand(1, 8, 8, 3), layout="row", size=64, gap=-1), "input 'gap': -1"),
    ("FireRedStitchImages", dict(image1=torch.rand(1, 8, 8, 3), layout="diagonal", size=64, gap=0),
     "input 'layout': layout 'diagonal'"),
    ("FireRedPadImage", dict(image=torch.zeros(0, 16, 16, 3)), "input 'image': the IMAGE is empty"),
    ("FireRedSpeedSettings", dict(SPEED, block_swap=-2), "input 'block_swap': -2 is not allowed"),
    ("FireRedSpeedSettings", dict(SPEED, cache_threshold=float("nan")), "input 'cache_threshold': nan"),
    ("FireRedCropBack", dict(image=torch.zeros(1, 0, 16, 3), crop=None), "input 'image': the IMAGE is empty"),
])
def test_node_inputs_out_of_range_or_empty(node, kwargs, culprit):
    inst = S.classes()[node]()
    with pytest.raises(FireRedError, match="input") as err:
        getattr(inst, inst.FUNCTION)(**kwargs)
    assert culprit in str(err.value) and str(err.value).startswith(inst.NAME)


@pytest.mark.parametrize("change, culprit", [
    (dict(steps=0), "input 'steps': 0"),
    (dict(true_cfg=float("inf")), "input 'true_cfg': inf"),
    (dict(seed=2**64), "input 'seed'"),
    (dict(seed=2**64 - 1, batch_size=2, seed_mode="increment"), "input 'seed': 18446744073709551616"),
    (dict(latent={"samples": torch.full((1, 16, 1, 4, 4), float("nan"))}),
     "input 'latent': the LATENT holds 256 non-finite value(s) of 256 (256 NaN, 0 inf)"),
    (dict(latent={"samples": torch.zeros(0, 16, 1, 4, 4)}), "input 'latent': the latent is empty"),
])
def test_sampler_refuses_bad_numbers_and_latents_before_sampling(model, change, culprit):
    C = S.classes()
    cond = C["FireRedEncodeInstruction"]().encode(model, "x", "pipeline")[0]
    kw = dict(model=model, positive=cond, latent={"samples": torch.zeros(1, 16, 1, 4, 4)}, seed=0, steps=1,
              true_cfg=1.0, shift=0.0, denoise=0.5, batch_size=1, seed_mode="batch")
    with pytest.raises(FireRedError) as err:
        C["FireRedSampler"]().sample(**{**kw, **change})
    assert culprit in str(err.value) and str(err.value).startswith("FireRed Sampler")


def test_sampler_blames_positive_for_an_instruction_too_long_for_the_output_size(model):
    """4070 instruction tokens fit alone (limit 4095) but not beside a 1024x1024 output (limit 4064): the sampler
    names its 'positive' input, not the model."""
    from dataclasses import replace

    from firered_core.conditioning import PromptEmbeds

    C = S.classes()
    cond = C["FireRedEncodeInstruction"]().encode(model, "x", "pipeline")[0]
    long = replace(cond, embeds=PromptEmbeds(torch.zeros(1, 4070, cond.embeds.embeds.shape[-1]), None))
    kw = dict(model=model, positive=long, latent={"samples": torch.zeros(1, 16, 1, 128, 128)}, seed=0, steps=1,
              true_cfg=1.0, shift=0.0, denoise=1.0, batch_size=1, seed_mode="batch")
    with pytest.raises(FireRedError, match=r"FireRed Sampler: input 'positive': the instruction is 4070 tokens"):
        C["FireRedSampler"]().sample(**kw)


def test_decode_node_refuses_a_nan_latent(model):
    with pytest.raises(FireRedError, match=r"FireRed Decode: input 'latent': the LATENT holds 1 non-finite"):
        z = torch.zeros(1, 16, 1, 4, 4)
        z[0, 3, 0, 1, 1] = float("nan")
        S.classes()["FireRedDecode"]().decode(model, {"samples": z})


# -- non-finite values inside the pipeline: refused with the step or tensor named, never a black image ----------
def test_sampler_stops_at_the_step_whose_prediction_is_not_finite():
    from firered_core.conditioning import PromptEmbeds
    from firered_core.sampling import sample

    cond = PromptEmbeds(torch.zeros(1, 2, 8), None)
    calls = []

    def denoiser(x, t, c, branch):
        calls.append(branch)
        return torch.full_like(x, float("nan")) if len(calls) == 3 else torch.zeros_like(x)

    with pytest.raises(OptionError, match=r"prediction at step 3 of 4 holds 8 non-finite.*black image"):
        sample(denoiser, torch.zeros(1, 2, 4), torch.linspace(1, 0, 5), cond)
    with pytest.raises(OptionError, match="true_cfg nan is not a finite number"):
        sample(denoiser, torch.zeros(1, 2, 4), torch.linspace(1, 0, 5), cond, cond, true_cfg=float("nan"))


def test_latents_with_nan_are_not_decoded(tiny_model):
    from firered_core.pipeline import decode_raw

    with pytest.raises(OptionError, match="the latent to decode holds 64 non-finite"):
        decode_raw(tiny_model.vae, torch.full((1, 16, 1, 2, 2), float("inf")))


def test_a_prompt_longer_than_the_text_positions_is_refused_up_front(tiny_model):
    from firered_core.conditioning import check_text_length, text_token_limit
    from firered_core.pipeline import EditPipeline

    assert text_token_limit([(1, 64, 64)]) == 4096 - 32  # a 1024x1024 output
    check_text_length(4064, [(1, 64, 64)])
    with pytest.raises(OptionError, match="4065 tokens long .* at most 4064"):
        check_text_length(4065, [(1, 64, 64)])
    te = tiny_model.text_encoder
    calls = []
    hook = te.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(OptionError, match=r"the instruction is \d+ tokens long"):
            EditPipeline(tiny_model).edit(None, "x" * 20000, None, steps=1, true_cfg=1.0, width=64, height=64)
    finally:
        hook.remove()
    assert not calls  # counted before the text encoder ran


# -- images and files --------------------------------------------------------------------------------------------
def test_decompression_bomb_is_refused_naming_the_file(tmp_path, monkeypatch, capsys):
    from firered_core.images import ImageInputError, load_image

    bomb = tmp_path / "bomb.png"
    Image.new("L", (400, 400)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 160000 px > 2x the limit: Pillow raises
    with pytest.raises(ImageInputError, match=f"{bomb}.*decompression bomb"):
        load_image(bomb)
    code, line = run_cli(["-i", str(bomb)], capsys)
    assert code == 2 and str(bomb) in line


@pytest.mark.parametrize("header, culprit", [
    ({"a": 5}, "tensor 'a' is described by a int"),
    ({"w": {"dtype": "F32", "shape": "x", "data_offsets": [0, 4]}}, "tensor 'w' has shape 'x'"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4]}}, "tensor 'w' has data_offsets [4]"),
    ({"w": {"shape": [1], "data_offsets": [0, 4]}}, "tensor 'w' has no dtype"),
    ({"__metadata__": [1]}, "__metadata__ is not a mapping"),
])
def test_malformed_safetensors_header_is_a_format_error(header, culprit, tmp_path):
    from firered_core.formats import FormatError, open_checkpoint

    raw = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    with pytest.raises(FormatError) as err:
        open_checkpoint(path)
    assert str(path) in str(err.value) and culprit in str(err.value)


def test_scheduler_config_json_error_names_the_file(tiny_model_dir, tmp_path):
    import shutil

    from firered_core.model import ModelError, load_model

    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir, copy)
    (copy / "scheduler" / "scheduler_config.json").write_text('{"shift": 1.0,')
    with pytest.raises(ModelError, match=r"scheduler_config.json: not valid JSON \(line 1"):
        load_model(copy).scheduler_config


# -- names chosen from model folders stay inside them; the folder walk is bounded ------------------------------
@pytest.mark.parametrize("name", ["../etc", "/etc", "a/../../b", "C:\\Windows"])
def test_loaders_refuse_names_outside_their_folders(model_dirs, name):
    with pytest.raises(FireRedError, match=r"FireRed Model Loader: input 'model_name': model name .*(absolute|\.\.)"):
        S.classes()["FireRedModelLoader"]().load(name, "fp32", "cpu", "none")
    with pytest.raises(FireRedError, match=r"FireRed LoRA Loader: input 'lora_name': LoRA name"):
        S.classes()["FireRedLoraLoader"]().load(None, name + ".safetensors", 1.0, "auto", False)


def test_symlink_loop_in_the_model_folder_does_not_hang(tmp_path, monkeypatch):
    root = tmp_path / "firered"
    (root / "good" / "deep").mkdir(parents=True)
    (root / "good" / "model_index.json").write_text("{}")
    os.symlink(root, root / "good" / "deep" / "loop")  # loop back to the root
    os.symlink(root / "good", root / "alias")  # a second name for a real folder: listed once
    monkeypatch.setenv("FIRERED_MODEL_DIRS", str(root))
    monkeypatch.setenv("FIRERED_LORA_DIRS", str(root))
    folders = S.submodule("_folders")
    found: list = []
    worker = threading.Thread(target=lambda: found.append((folders.list_model_folders(), folders.list_loras())),
                              daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "listing model folders hangs on a symlink loop"
    models, _ = found[0]
    assert models in (["good"], ["alias"])


# -- LoRAs: NaN / huge tensors named, rank mismatch said with shapes, PEFT adapter folders -----------------------
def _state(model, **kw) -> dict[str, torch.Tensor]:
    return lora_state_dict(make_weights(model, **kw), "diffusers")


@pytest.mark.parametrize("plant, culprit", [
    ("nan", r"LoRA bad.safetensors: tensor transformer\.transformer_blocks\.0\.attn\.to_q\.lora_B\.weight .* "
            r"holds 1 NaN/inf"),
    ("huge", r"LoRA bad.safetensors: the change to transformer_blocks\.0\.attn\.to_q reaches"),
    ("rank", r"LoRA bad.safetensors does not fit this transformer: .*rank mismatch: lora_A \(4, \d+\), "
             r"lora_B \(\d+, 3\)"),
    ("shape", r"shape mismatch: the rank 4 pair makes a \(\d+, \d+\) change .* but the weight is"),
])
def test_bad_lora_tensors_are_refused_naming_file_and_tensor(transformer, tmp_path, plant, culprit):  # noqa: F811
    sd = _state(transformer, targets=["transformer_blocks.0.attn.to_q"])
    up = "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"
    down = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    if plant == "nan":
        sd[up][0, 0] = float("nan")
    elif plant == "huge":
        sd[up] = sd[up] * 1e20
    elif plant == "rank":
        sd[up] = sd[up][:, :3].contiguous()
    else:
        sd[down] = torch.randn(4, sd[down].shape[1] + 8)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    with pytest.raises(LoraError, match=culprit):
        apply_loras(transformer, [LoraSpec(path=path)], allow_partial=True)
    assert all(torch.equal(before[k], v) for k, v in transformer.state_dict().items())


def test_lora_strength_must_be_finite_and_in_range(transformer, tmp_path):  # noqa: F811
    path = tmp_path / "ok.safetensors"
    save_file(_state(transformer), str(path))
    for strength in (1e30, float("nan")):
        with pytest.raises(OptionError, match=r"LoRA ok.safetensors: strength .* must be a number in -10..10"):
            apply_loras(transformer, [LoraSpec(path=path, strength=strength)])


def test_peft_adapter_folder_with_rank_and_alpha_patterns(transformer, tmp_path):  # noqa: F811
    weights = make_weights(transformer, rank=4, alpha=2.0)
    odd = "transformer_blocks.0.attn.to_q"
    gen = torch.Generator().manual_seed(5)
    weights[odd] = type(weights[odd])(torch.randn(6, weights[odd].down.shape[1], generator=gen) * 0.1,
                                      torch.randn(weights[odd].up.shape[0], 6, generator=gen) * 0.1, 12.0)
    folder = tmp_path / "adapter"
    save_lora(weights, folder, style="peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {odd: 6} and config["alpha_pattern"] == {odd: 12.0}
    base = {k: v.clone() for k, v in transformer.state_dict().items()}
    report = apply_loras(transformer, [LoraSpec(path=folder, strength=0.5)])
    assert not report.unmatched and not report.loras[0].notes
    linears = linear_modules(transformer)
    for m, w in weights.items():  # each module at its own alpha / rank (alpha_pattern honoured)
        want = base[m + ".weight"] + 0.5 * (w.alpha / w.rank) * (w.up @ w.down)
        torch.testing.assert_close(linears[m].weight, want, rtol=1e-5, atol=1e-6)


def test_peft_adapter_config_errors_name_the_file_and_key(transformer, tmp_path):  # noqa: F811
    folder = tmp_path / "adapter"
    save_lora(make_weights(transformer), folder, style="peft")
    cfg = folder / "adapter_config.json"
    good = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**good, "rank_pattern": {"transformer_blocks.0.attn.to_q": 8}}))
    with pytest.raises(LoraError, match=r"(?s)transformer_blocks\.0\.attn\.to_q: rank mismatch: the adapter config "
                                        r"says rank 8, the tensors have rank 4 \(lora_A \(4, \d+\), lora_B"):
        apply_loras(transformer, [LoraSpec(path=folder)])
    cfg.write_text(json.dumps({**good, "r": "four"}))
    with pytest.raises(LoraError, match=rf"{cfg}: key 'r' = 'four'"):
        apply_loras(transformer, [LoraSpec(path=folder)])
    cfg.write_text('{"r": 4,,}')
    with pytest.raises(LoraError, match=rf"{cfg}: not valid JSON \(line 1, column 9"):
        apply_loras(transformer, [LoraSpec(path=folder)])
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(LoraError, match=rf"LoRA folder {folder} has no adapter_model.safetensors"):
        apply_loras(transformer, [LoraSpec(path=folder)])


def test_bare_adapter_model_states_the_assumed_alpha(transformer, tmp_path):  # noqa: F811
    weights = make_weights(transformer, alpha=None)
    folder = tmp_path / "bare"
    save_lora(weights, folder, style="peft")
    (folder / "adapter_config.json").unlink()
    report = apply_loras(transformer, [folder / "adapter_model.safetensors"])
    assert "alpha unknown for 5 module(s)" in report.summary() and "assumed scale 1.0 (alpha = rank)" in \
        report.summary()


def test_peft_folder_from_the_cli_and_the_lora_node(model, tiny_model_dir, lora_dir, tmp_path, capsys,  # noqa: F811
                                                     monkeypatch):
    from firered_core.lora import lora_weights_from_state_dict, read_lora_file

    state, _ = read_lora_file(lora_dir / "a.safetensors")
    loras = tmp_path / "loras"
    save_lora(lora_weights_from_state_dict(state, linear_modules(model.transformer)), loras / "peft", style="peft")
    out = tmp_path / "out.png"
    code = cli.main(["-p", "x", "--model", str(tiny_model_dir), "--lora", f"{loras / 'peft'}:0.5", "--steps", "1",
                     "--true-cfg", "1", "--width", "32", "--height", "32", "-o", str(out)])
    assert code == 0 and out.is_file()
    assert "LoRA peft (strength 0.5, peft keys): 8/8 keys matched" in capsys.readouterr().err
    monkeypatch.setenv("FIRERED_LORA_DIRS", str(loras))
    node = S.classes()["FireRedLoraLoader"]
    assert node.INPUT_TYPES()["required"]["lora_name"][0] == ["peft/adapter_model.safetensors"]
    view, report = node().load(model, "peft/adapter_model.safetensors", 0.5, "auto", False)
    assert "UNMATCHED" not in report and view is not model
