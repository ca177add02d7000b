"""Single-file formats written from the tiny model by hand (ComfyUI / fp8 / scaled fp8 / GGUF / legacy torch) and
loaded back: lossless ones exactly, quantised ones within the bounds stated in firered_core.formats.dequant."""

from __future__ import annotations

import pytest
import torch

from firered_core.formats.gguf import write_gguf
from safetensors.torch import save_file

from firered_core.formats import (FormatError, convert_diffusers_vae_state, detect_transformer_config,
                                  load_single_file, load_text_encoder_processor)


@pytest.fixture(scope="module")
def transformer():
    from diffusers import QwenImageTransformer2DModel

    from firered_core.demo_models import _perturb_zero_inits, transformer_config

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**transformer_config("tiny")).eval()
    _perturb_zero_inits(model, 3)
    return model


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKLQwenImage

    from firered_core.demo_models import vae_config

    torch.manual_seed(1)
    return AutoencoderKLQwenImage(**vae_config("tiny")).eval()


def run(model) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x, c = torch.randn(1, 16, 64, generator=gen), torch.randn(1, 5, 64, generator=gen)
    with torch.no_grad():
        return model(hidden_states=x, encoder_hidden_states=c, encoder_hidden_states_mask=None,
                     timestep=torch.tensor([0.5]), img_shapes=[[(1, 4, 4)]], return_dict=False)[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def save(sd: dict, path) -> str:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


def assert_same_state(model, ref: dict):
    got = model.state_dict()
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v), k


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_transformer_lossless_files_give_identical_outputs(transformer, tmp_path, prefix):
    ref = transformer.state_dict()
    path = save({prefix + k: v for k, v in ref.items()}, tmp_path / "t.safetensors")
    loaded = load_single_file("transformer", path, torch.float32)
    assert_same_state(loaded, ref)
    assert torch.equal(run(loaded), run(transformer))


def test_transformer_bf16_file_is_exact_to_its_stored_values(transformer, tmp_path):
    ref = {k: v.to(torch.bfloat16) for k, v in transformer.state_dict().items()}
    loaded = load_single_file("transformer", save(ref, tmp_path / "t.safetensors"), torch.float32)
    assert_same_state(loaded, {k: v.float() for k, v in ref.items()})


def test_legacy_torch_file_weights_only(transformer, tmp_path):
    ref = transformer.state_dict()
    torch.save({"state_dict": dict(ref)}, tmp_path / "t.pt")
    assert_same_state(load_single_file("transformer", tmp_path / "t.pt", torch.float32), ref)


def _fp8_state(ref: dict, fp8: torch.dtype, scaled: bool) -> dict:
    """ComfyUI fp8 files: matrices in fp8 (scaled ones with a float32 ``scale_weight``), the rest in bf16."""
    out = {"scaled_fp8": torch.empty(0, dtype=fp8)} if scaled else {}
    for k, v in ref.items():
        if v.dim() == 2 and k.endswith(".weight"):
            if scaled:
                scale = v.abs().max() / torch.finfo(fp8).max
                out[k] = (v / scale).to(fp8)
                out[k[: -len("weight")] + "scale_weight"] = scale.reshape(1).float()
            else:
                out[k] = v.to(fp8)
        else:
            out[k] = v.to(torch.bfloat16)
    return out


# Per-element bound: relative 2**-mantissa_bits (round to nearest) above the normal range, absolute below it.
FP8_BOUNDS = {torch.float8_e4m3fn: (2 ** -4, 2 ** -9), torch.float8_e5m2: (2 ** -3, 2 ** -16)}


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("scaled", [False, True])
def test_fp8_files_within_the_stated_bound(transformer, tmp_path, fp8, scaled):
    ref = transformer.state_dict()
    path = save({"model.diffusion_model." + k: v for k, v in _fp8_state(ref, fp8, scaled).items()},
                tmp_path / "t.safetensors")
    loaded = load_single_file("transformer", path, torch.float32)
    rel, tiny = FP8_BOUNDS[fp8]
    got = loaded.state_dict()
    for k, v in ref.items():
        if v.dim() == 2:
            unit = float(v.abs().max() / torch.finfo(fp8).max) if scaled else 1.0
            assert ((got[k] - v).abs() <= rel * v.abs() + tiny * unit + 1e-12).all(), k
            assert not torch.equal(got[k], v), f"{k}: fp8 left no trace; the planted rounding was not loaded"
    err = rel_err(run(loaded), run(transformer))
    assert err < (0.08 if fp8 == torch.float8_e4m3fn else 0.15), err


def _write_gguf(ref: dict, path, qtype) -> None:
    write_gguf(ref, path, qtype.name)


@pytest.mark.parametrize("qname,block_bound,out_bound", [("Q8_0", 1 / 254 + 1e-3, 0.02), ("Q4_0", 1 / 8 + 1e-3, 0.3)])
def test_gguf_within_the_stated_bound(transformer, tmp_path, qname, block_bound, out_bound):
    import gguf

    ref = transformer.state_dict()
    _write_gguf(ref, tmp_path / "t.gguf", getattr(gguf.GGMLQuantizationType, qname))
    loaded = load_single_file("transformer", tmp_path / "t.gguf", torch.float32, gguf_mode="load")
    got = loaded.state_dict()
    for k, v in ref.items():
        if v.dim() == 2 and v.shape[1] % 32 == 0:
            blocks_ref, blocks_got = v.reshape(-1, 32), got[k].reshape(-1, 32)
            amax = blocks_ref.abs().amax(dim=1, keepdim=True)
            assert ((blocks_got - blocks_ref).abs() <= block_bound * amax + 1e-7).all(), k
        else:
            assert torch.equal(got[k], v), k
    err = rel_err(run(loaded), run(transformer))
    assert 0 < err < out_bound, err


def test_architecture_is_read_from_tensors(transformer, tmp_path):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    other = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=3,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                        axes_dims_rope=(4, 6, 6))
    sd = {"model.diffusion_model." + k: v for k, v in other.state_dict().items()}
    cfg = detect_transformer_config(sd)
    assert (cfg["num_layers"], cfg["num_attention_heads"], cfg["joint_attention_dim"], cfg["zero_cond_t"]) == \
        (3, 2, 48, False)
    sd["model.diffusion_model.__index_timestep_zero__"] = torch.empty(0)
    path = save(sd, tmp_path / "t.safetensors")
    loaded = load_single_file("transformer", path, torch.float32)
    assert loaded.config.num_layers == 3 and loaded.config.zero_cond_t is True
    assert detect_transformer_config(transformer.state_dict())["num_layers"] == 2


def test_vae_comfy_names_convert_exactly(vae, tmp_path):
    ref = vae.state_dict()
    comfy = convert_diffusers_vae_state(ref)
    assert "decoder.middle.0.residual.0.gamma" in comfy and "decoder.upsamples.2.resample.1.weight" in comfy
    assert not any("up_blocks" in k or "mid_block" in k for k in comfy)
    for state in (comfy, ref):
        loaded = load_single_file("vae", save(state, tmp_path / "v.safetensors"), torch.float32)
        assert_same_state(loaded, ref)
    z = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.decode(z).sample, vae.decode(z).sample)


def test_vae_with_a_misplaced_block_is_refused(vae, tmp_path):
    comfy = convert_diffusers_vae_state(vae.state_dict())
    comfy = {k.replace("decoder.upsamples.4.", "decoder.upsamples.9."): v for k, v in comfy.items()}
    with pytest.raises(FormatError, match="v.safetensors"):
        load_single_file("vae", save(comfy, tmp_path / "v.safetensors"), torch.float32)


def test_text_encoder_comfy_layout_without_lm_head(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from firered_core.demo_models import build_tokenizer, text_encoder_config

    torch.manual_seed(2)
    ref_model = Qwen2_5_VLForConditionalGeneration(text_encoder_config("tiny", build_tokenizer())).eval()
    ref = ref_model.state_dict()
    legacy = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
              for k, v in ref.items() if k != "lm_head.weight"}
    path = save({k: v.to(torch.bfloat16) for k, v in legacy.items()}, tmp_path / "qwen_2.5_vl_tiny.safetensors")
    loaded = load_single_file("text_encoder", path, torch.float32)
    got = loaded.state_dict()
    for k, v in ref.items():
        if k != "lm_head.weight":
            assert torch.equal(got[k], v.to(torch.bfloat16).float()), k
    assert torch.equal(got["lm_head.weight"], got["model.language_model.embed_tokens.weight"])
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        h = loaded(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        ref_model.to(torch.bfloat16).float()
        want = ref_model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert torch.allclose(h, want, atol=1e-5)
    assert load_text_encoder_processor(path).tokenizer is not None


def test_text_encoder_of_unknown_size_says_what_it_found(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from firered_core.demo_models import build_tokenizer, text_encoder_config

    cfg = text_encoder_config("tiny", build_tokenizer())
    cfg.text_config.intermediate_size = 96
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    path = save(model.state_dict(), tmp_path / "te.safetensors")
    with pytest.raises(FormatError, match=r"te\.safetensors.*hidden 64, 2 layers.*config\.json"):
        load_single_file("text_encoder", path, torch.float32)


def test_truncated_file_is_refused_with_its_name(transformer, tmp_path):
    path = tmp_path / "cut.safetensors"
    save(transformer.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match=r"cut\.safetensors.*truncated"):
        load_single_file("transformer", path, torch.float32)


def test_non_safetensors_file_is_refused_with_its_name(tmp_path):
    path = tmp_path / "page.safetensors"
    path.write_text("<!DOCTYPE html><html>rate limited</html>" * 10)
    with pytest.raises(FormatError, match=r"page\.safetensors.*not a safetensors"):
        load_single_file("transformer", path, torch.float32)


class _Payload:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_Payload.marker),))


def test_pickle_code_never_runs(tmp_path):
    _Payload.marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.ckpt"
    torch.save({"weight": torch.zeros(2), "x": _Payload()}, path)
    with pytest.raises(FormatError, match=r"evil\.ckpt.*weights-only"):
        load_single_file("transformer", path, torch.float32)
    assert not (tmp_path / "pwned").exists()


def test_wrong_architecture_is_named(vae, tmp_path):
    path = save(vae.state_dict(), tmp_path / "vae.safetensors")
    with pytest.raises(FormatError, match=r"vae\.safetensors.*not a Qwen-Image.*VAE \(diffusers names\)"):
        load_single_file("transformer", path, torch.float32)


def test_missing_block_is_named(transformer, tmp_path):
    sd = {k: v for k, v in transformer.state_dict().items() if not k.startswith("transformer_blocks.0.")}
    with pytest.raises(FormatError, match="block"):
        load_single_file("transformer", save(sd, tmp_path / "t.safetensors"), torch.float32)


def test_header_is_read_lazily(transformer, tmp_path):
    from firered_core.formats import open_checkpoint

    path = save(transformer.state_dict(), tmp_path / "t.safetensors")
    with open_checkpoint(path) as ckpt:
        assert ckpt.shape("img_in.weight") == (64, 64) and ckpt.dtype("img_in.weight") == torch.float32
        assert detect_transformer_config(ckpt)["num_layers"] == 2
