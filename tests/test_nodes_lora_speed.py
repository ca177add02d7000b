"""FireRed LoRA Loader (a view of the model: the shared model stays bit-identical), FireRed Speed Settings (lossless
options give the plain output) and FireRed Unload Models, without ComfyUI."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import nodes_support as S  # noqa: E402
from test_nodes import image, lora_dir, model, model_dirs, single_file_dir  # noqa: E402,F401
from tolerances import sampled_atol  # noqa: E402

SETTINGS = dict(batched_cfg=False, block_cache=False, cache_threshold=0.08, cache_first=1, cache_last=1,
                cache_warmup=2, cache_max_consecutive=3, taylorseer=False, quantize="none",
                quantize_text_encoder="none", fp8_mode="load", compile="none", attention="sdpa", block_swap=0,
                vae_tiling=False, embed_cache=True, embed_cache_dir="")


def speed(**changes):
    return S.classes()["FireRedSpeedSettings"]().settings(**{**SETTINGS, **changes})[0]


_conds: dict[int, tuple] = {}


def edit(model, speed=None, seed=3) -> torch.Tensor:
    """2 sampler steps with true CFG (conditioning encoded once per text encoder: LoRAs leave it alone)."""
    C = S.classes()
    key = id(model.text_encoder)
    if key not in _conds:
        refs = C["FireRedReferenceImages"]().prepare(model, 56, "area", 64, image1=image(48, 32))[0]
        _conds[key] = (C["FireRedEncodeInstruction"]().encode(model, "make it blue", "pipeline", refs)[0],
                       C["FireRedEncodeInstruction"]().encode(model, " ", "pipeline", refs)[0])
    pos, neg = _conds[key]
    latent = C["FireRedImageSize"]().size("width x height", 1.0, 32, 32)[0]
    return C["FireRedSampler"]().sample(model, pos, latent, seed, 2, 4.0, 0.0, 1.0, 1, "batch", negative=neg,
                                        speed=speed)[0]["samples"]


def lora(model, name="a.safetensors", strength=0.8, mode="auto", allow_partial=False):
    return S.classes()["FireRedLoraLoader"]().load(model, name, strength, mode, allow_partial)


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def in_place(model_dir, specs, mode):
    """A separate model with firered_core.lora.apply_loras applied in place (what the CLI does)."""
    from firered_core.lora import apply_loras
    from firered_core.model import load_model

    reference = load_model(model_dir)
    apply_loras(reference.transformer, specs, mode=mode)
    return reference


@pytest.mark.parametrize("mode", ["merge", "adapter"])
def test_lora_node_equals_apply_loras_and_base_stays_bit_identical(model, model_dirs, lora_dir, mode):
    from firered_core.lora import LoraSpec

    before, base_weights = edit(model), weights(model.transformer)
    view, report = lora(model, mode=mode)
    S.check_value("FIRERED_MODEL", view)
    assert view is not model and view.vae is model.vae and view.text_encoder is model.text_encoder
    assert f"mode: {mode}" in report and "12/12 keys matched, 4 modules touched" in report
    got = edit(view)
    assert not torch.allclose(got, before)
    expected = edit(in_place(model_dirs, [LoraSpec(lora_dir / "a.safetensors", 0.8)], mode))
    assert torch.equal(got, expected)
    after = weights(model.transformer)
    assert set(after) == set(base_weights) and all(torch.equal(after[k], base_weights[k]) for k in after)
    assert torch.equal(edit(model), before)


def test_chained_loras_stack_like_one_apply(model, model_dirs, lora_dir):
    from firered_core.lora import LoraSpec

    before = edit(model)
    first, _ = lora(model, "a.safetensors", 0.8, "adapter")
    first_out = edit(first)
    second, report = lora(first, "sub/b.safetensors", -1.5, "adapter")
    assert "LoRAs on this model: a.safetensors (0.8, adapter), sub/b.safetensors (-1.5, adapter)" in report
    specs = [LoraSpec(lora_dir / "a.safetensors", 0.8), LoraSpec(lora_dir / "sub" / "b.safetensors", -1.5)]
    assert torch.equal(edit(second), edit(in_place(model_dirs, specs, "adapter")))
    assert torch.equal(edit(first), first_out) and torch.equal(edit(model), before)
    merged, _ = lora(lora(model, "a.safetensors", 0.8, "merge")[0], "sub/b.safetensors", -1.5, "merge")
    torch.testing.assert_close(edit(merged), edit(second), rtol=1e-5, atol=1e-5)


def test_bad_lora_names_the_input_and_the_key(model):
    E = S.submodule("_errors").NodeInputError
    with pytest.raises(E, match=r"(?s)FireRed LoRA Loader: input 'lora_name'.*renamed.*attn\.to_query"):
        lora(model, "renamed.safetensors")
    view, report = lora(model, "renamed.safetensors", allow_partial=True)
    assert "UNMATCHED" in report and "to_query" in report
    with pytest.raises(E, match="'lora_name'.*not found"):
        lora(model, "missing.safetensors")


def test_lora_loader_lists_the_lora_folder(model_dirs):
    names = S.classes()["FireRedLoraLoader"].INPUT_TYPES()["required"]["lora_name"][0]
    assert names == ["a.safetensors", "renamed.safetensors", "sub/b.safetensors"]


def test_block_cache_threshold_zero_and_batched_cfg_give_the_plain_output(model):
    plain = edit(model)
    assert torch.equal(edit(model, speed(block_cache=True, cache_threshold=0.0)), plain)
    # one batched pass sums in another order than two (tests/tolerances.py: 2 steps, latents of size <= 4)
    torch.testing.assert_close(edit(model, speed(batched_cfg=True)), plain, rtol=0, atol=sampled_atol(2, scale=4.0))
    from firered_core import comfy_latents as CL
    from firered_core.pipeline import denoise_latents

    settings = speed(block_cache=True, cache_threshold=10.0, cache_warmup=0, cache_last=0)
    cached = edit(model, settings)
    pos, neg = _conds[id(model.text_encoder)]
    tokens, stats = denoise_latents(model, settings.run, pos.embeds, neg.embeds, pos.refs.latents, 32, 32, 3, 2, 4.0)
    assert stats["block_cache"]["computed"] < stats["block_cache"]["total"]  # these settings do skip blocks
    assert not torch.equal(cached, plain)
    torch.testing.assert_close(cached, CL.to_raw(tokens, 32, 32, model.vae.config).float(), rtol=1e-6, atol=1e-6)


def test_model_level_settings_belong_to_the_loader(model_dirs):
    loader, E = S.classes()["FireRedModelLoader"](), S.submodule("_errors").NodeInputError
    plain = loader.load(model_dirs.name, "fp32", "cpu", "none")[0]
    int8 = speed(quantize="int8")
    with pytest.raises(E, match="'speed'.*quantize='int8'.*FireRed Model Loader"):
        edit(plain, int8)
    quantised = loader.load(model_dirs.name, "fp32", "cpu", "none", speed=int8)[0]
    assert quantised is not plain and quantised is loader.load(model_dirs.name, "fp32", "cpu", "none",
                                                                 speed=speed(quantize="int8", batched_cfg=True))[0]
    view, _ = lora(quantised)
    out = edit(view, int8)
    assert torch.isfinite(out).all()
    from firered_core.memory import QuantLinear

    assert any(isinstance(m, QuantLinear) for m in view.transformer.modules())
    assert not any(isinstance(m, QuantLinear) for m in quantised.transformer.modules())


def test_unload_models_frees_and_reloads(model, model_dirs):
    before = edit(model)
    view, _ = lora(model)
    lora_out = edit(view)
    img = image(16, 16)
    unload = S.classes()["FireRedUnloadModels"]
    assert unload.OUTPUT_NODE and unload().unload(img)[0] is img
    assert not model.is_loaded("transformer") and not S.submodule("loaders")._cache
    assert torch.equal(edit(model), before) and torch.equal(edit(view), lora_out)


def test_speed_settings_errors_name_the_input():
    with pytest.raises(S.submodule("_errors").NodeInputError, match="'compile'.*block swap"):
        speed(compile="blocks", block_swap=2)
    settings = speed(block_cache=True, cache_threshold=0.1, embed_cache_dir=" ")
    assert settings.run.cache_threshold == 0.1 and settings.model.embed_cache_dir is None
    assert speed().run.cache_threshold == 0.0


FIRST_RELEASE_WIDGETS = ["batched_cfg", "block_cache", "cache_threshold", "cache_first", "cache_last", "cache_warmup",
                         "cache_max_consecutive", "taylorseer", "quantize", "quantize_text_encoder", "compile",
                         "block_swap", "vae_tiling", "embed_cache", "embed_cache_dir"]


def test_speed_settings_saved_before_new_inputs_keep_their_values():
    """ComfyUI maps a saved node's widgets_values by position: inputs added later go last and optional, so a
    workflow saved with the first release's Speed Settings still gives each value to its widget."""
    inputs = S.classes()["FireRedSpeedSettings"].INPUT_TYPES()
    assert list(inputs["required"]) == FIRST_RELEASE_WIDGETS
    assert list(inputs["optional"]) == ["fp8_mode", "attention"]
    old = dict(zip(FIRST_RELEASE_WIDGETS, [True, False, 0.08, 1, 1, 2, 3, False, "int8", "none", "none", 0, False,
                                           True, ""]))
    settings = S.classes()["FireRedSpeedSettings"]().settings(**old)[0]
    assert settings.model.quantize == "int8" and settings.model.fp8_mode == "load"
    assert settings.model.attention == speed().model.attention
