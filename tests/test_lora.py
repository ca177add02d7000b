"""LoRA key styles, scales, coverage errors, several LoRAs, adapter mode, and bit-exact removal (tiny transformer)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from firered_core.lora import (LoraError, LoraSpec, LoraWeights, apply_loras, linear_modules, lora_state_dict,
                               remove_loras, save_lora)
from test_formats import run

TARGETS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0", "transformer_blocks.1.img_mod.1",
           "transformer_blocks.1.txt_mlp.net.2", "img_in"]


@pytest.fixture
def transformer():
    from diffusers import QwenImageTransformer2DModel

    from firered_core.demo_models import transformer_config

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(**transformer_config("tiny")).eval().requires_grad_(False)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def make_weights(model, rank=4, alpha=2.0, seed=0, targets=TARGETS) -> dict[str, LoraWeights]:
    gen = torch.Generator().manual_seed(seed)
    linears = linear_modules(model)
    return {m: LoraWeights(torch.randn(rank, linears[m].in_features, generator=gen) * 0.1,
                           torch.randn(linears[m].out_features, rank, generator=gen) * 0.1, alpha) for m in targets}


def expected(base: dict, loras: list[tuple[dict[str, LoraWeights], float]]) -> dict[str, torch.Tensor]:
    """W + sum(strength * alpha / rank * B @ A), computed by hand."""
    out = dict(base)
    for weights, strength in loras:
        for m, w in weights.items():
            scale = 1.0 if w.alpha is None else w.alpha / w.down.shape[0]
            out[m + ".weight"] = out[m + ".weight"] + strength * scale * (w.up @ w.down)
    return out


def hand_style(weights: dict[str, LoraWeights], style: str) -> dict[str, torch.Tensor]:
    """LoRA files written by hand in each documented key style (independent of save_lora)."""
    sd = {}
    for m, w in weights.items():
        alpha = None if w.alpha is None else torch.tensor(w.alpha)
        if style == "diffusers":
            sd |= {f"transformer.{m}.lora_A.weight": w.down, f"transformer.{m}.lora_B.weight": w.up}
            if alpha is not None:
                sd[f"transformer.{m}.alpha"] = alpha
        elif style == "comfy_AB":
            sd |= {f"diffusion_model.{m}.lora_A.weight": w.down, f"diffusion_model.{m}.lora_B.weight": w.up,
                   f"diffusion_model.{m}.alpha": alpha}
        elif style == "comfy_updown":
            sd |= {f"diffusion_model.{m}.lora_down.weight": w.down, f"diffusion_model.{m}.lora_up.weight": w.up,
                   f"diffusion_model.{m}.alpha": alpha}
        elif style == "kohya":
            k = "lora_unet_" + m.replace(".", "_")
            sd |= {f"{k}.lora_down.weight": w.down, f"{k}.lora_up.weight": w.up, f"{k}.alpha": alpha}
        elif style == "peft_named_adapter":
            sd |= {f"base_model.model.{m}.lora_A.default.weight": w.down,
                   f"base_model.model.{m}.lora_B.default.weight": w.up, f"base_model.model.{m}.alpha": alpha}
        elif style == "bare":
            sd |= {f"{m}.lora_A.weight": w.down, f"{m}.lora_B.weight": w.up, f"{m}.alpha": alpha}
    return {k: v for k, v in sd.items() if v is not None}


def assert_weights(model, want: dict[str, torch.Tensor], atol=1e-6):
    got = model.state_dict()
    for k, v in want.items():
        assert torch.allclose(got[k], v, atol=atol, rtol=0), k


@pytest.mark.parametrize("style", ["diffusers", "comfy_AB", "comfy_updown", "kohya", "peft_named_adapter", "bare"])
def test_each_key_style_equals_scale_B_A_by_hand(transformer, tmp_path, style):
    base = snapshot(transformer)
    weights = make_weights(transformer, rank=4, alpha=2.0)
    path = tmp_path / f"{style}.safetensors"
    save_file({k: v.contiguous() for k, v in hand_style(weights, style).items()}, str(path))
    report = apply_loras(transformer, [LoraSpec(path, strength=0.7)])
    assert sorted(report.modules) == sorted(TARGETS)
    assert not report.unmatched and len(report.matched) == len(hand_style(weights, style))
    assert_weights(transformer, expected(base, [(weights, 0.7)]))
    changed = [k for k in base if not torch.equal(base[k], transformer.state_dict()[k])]
    assert sorted(changed) == sorted(m + ".weight" for m in TARGETS)


def test_no_alpha_means_scale_one(transformer):
    base = snapshot(transformer)
    weights = make_weights(transformer, rank=4, alpha=None)
    apply_loras(transformer, [LoraSpec(state_dict=hand_style(weights, "diffusers"))])
    assert_weights(transformer, expected(base, [(weights, 1.0)]))


def test_peft_adapter_config_gives_alpha(transformer, tmp_path):
    base = snapshot(transformer)
    weights = make_weights(transformer, rank=4, alpha=None)
    sd = {f"base_model.model.{m}.lora_{p}.weight": t for m, w in weights.items()
          for p, t in (("A", w.down), ("B", w.up))}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"r": 4, "lora_alpha": 16, "alpha_pattern": {"img_in": 4}, "peft_type": "LORA"}))
    apply_loras(transformer, [tmp_path / "adapter_model.safetensors"])
    want = {m: LoraWeights(w.down, w.up, 4.0 if m == "img_in" else 16.0) for m, w in weights.items()}
    assert_weights(transformer, expected(base, [(want, 1.0)]))


@pytest.mark.parametrize("style", ["comfy", "kohya", "diffusers", "peft"])
def test_save_lora_round_trips_through_apply(transformer, tmp_path, style):
    base = snapshot(transformer)
    weights = make_weights(transformer, rank=4, alpha=8.0)
    written = save_lora(weights, tmp_path / ("out" if style == "peft" else "out.safetensors"), style=style)
    apply_loras(transformer, [LoraSpec(written, strength=-0.5)])
    assert_weights(transformer, expected(base, [(weights, -0.5)]), atol=1e-5)


def test_renamed_key_is_refused_by_name_and_model_untouched(transformer):
    base = snapshot(transformer)
    sd = hand_style(make_weights(transformer), "comfy_updown")
    bad = "diffusion_model.transformer_blocks.0.attn.to_qq.lora_down.weight"
    sd[bad] = sd.pop("diffusion_model.transformer_blocks.0.attn.to_q.lora_down.weight")
    with pytest.raises(LoraError, match=r"to_qq\.lora_down\.weight"):
        apply_loras(transformer, [LoraSpec(state_dict=sd, name="renamed.safetensors")])
    assert all(torch.equal(v, transformer.state_dict()[k]) for k, v in base.items())


def test_partial_allowed_applies_the_rest_and_reports_the_missing(transformer):
    sd = hand_style(make_weights(transformer), "comfy_updown")
    bad = "diffusion_model.transformer_blocks.0.attn.to_qq.lora_down.weight"
    sd[bad] = sd.pop("diffusion_model.transformer_blocks.0.attn.to_q.lora_down.weight")
    report = apply_loras(transformer, [LoraSpec(state_dict=sd, name="renamed")], allow_partial=True)
    assert "transformer_blocks.0.attn.to_q" not in report.modules and len(report.modules) == len(TARGETS) - 1
    unmatched = report.loras[0].unmatched
    assert bad in unmatched and "without its pair" in unmatched[
        "diffusion_model.transformer_blocks.0.attn.to_q.lora_up.weight"]
    assert "UNMATCHED" in report.summary()


def test_lora_for_another_model_is_an_error(transformer):
    sd = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
          "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)}
    with pytest.raises(LoraError, match="none of its 2 keys"):
        apply_loras(transformer, [LoraSpec(state_dict=sd)])


def test_dora_and_tucker_are_refused_clearly(transformer):
    sd = hand_style(make_weights(transformer, targets=TARGETS[:1]), "diffusers")
    sd["transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector"] = torch.ones(64)
    sd["transformer.img_in.dora_scale"] = torch.ones(64, 1)
    with pytest.raises(LoraError) as err:
        apply_loras(transformer, [LoraSpec(state_dict=sd)])
    assert "dora_scale" in str(err.value) and "lora_magnitude_vector" in str(err.value)


def test_several_loras_with_negative_strength_then_bit_exact_remove(transformer):
    base = snapshot(transformer)
    out0 = run(transformer)
    a = make_weights(transformer, rank=4, alpha=4.0, seed=1)
    b = make_weights(transformer, rank=2, alpha=1.0, seed=2, targets=TARGETS[:3])
    report = apply_loras(transformer, [LoraSpec(state_dict=hand_style(a, "kohya"), strength=0.8, name="a"),
                                       LoraSpec(state_dict=hand_style(b, "diffusers"), strength=-1.5, name="b")])
    assert [c.name for c in report.loras] == ["a", "b"]
    assert_weights(transformer, expected(base, [(a, 0.8), (b, -1.5)]))
    assert not torch.equal(run(transformer), out0)
    assert remove_loras(transformer) == len(TARGETS)
    after = transformer.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base.items())
    assert torch.equal(run(transformer), out0)


def test_adapter_mode_matches_merge_and_removes_exactly(transformer):
    out0 = run(transformer)
    modules_before = dict(transformer.named_modules())
    a = make_weights(transformer, rank=4, alpha=4.0, seed=1)
    b = make_weights(transformer, rank=2, alpha=1.0, seed=2, targets=TARGETS[:2])
    specs = [LoraSpec(state_dict=hand_style(a, "bare"), strength=0.9),
             LoraSpec(state_dict=hand_style(b, "comfy_AB"), strength=-0.4)]
    apply_loras(transformer, specs, mode="adapter")
    adapter_out = run(transformer)
    assert type(transformer.get_submodule("img_in")).__name__ == "LoraLinear"
    remove_loras(transformer)
    assert all(transformer.get_submodule(n) is m for n, m in modules_before.items() if n)
    assert torch.equal(run(transformer), out0)
    apply_loras(transformer, specs, mode="merge")
    merged_out = run(transformer)
    assert torch.allclose(adapter_out, merged_out, atol=1e-5)
    assert not torch.allclose(adapter_out, out0, atol=1e-3)


def test_lokr_and_loha_by_hand(transformer):
    base = snapshot(transformer)
    gen = torch.Generator().manual_seed(3)
    w1, w2a, w2b = torch.randn(4, 8, generator=gen), torch.randn(16, 2, generator=gen), torch.randn(2, 8, generator=gen)
    h = [torch.randn(s, generator=gen) * 0.1 for s in ((64, 3), (3, 64), (64, 3), (3, 64))]
    sd = {"lycoris_transformer_blocks_0_attn_to_q.lokr_w1": w1, "lycoris_transformer_blocks_0_attn_to_q.lokr_w2_a": w2a,
          "lycoris_transformer_blocks_0_attn_to_q.lokr_w2_b": w2b,
          "lycoris_transformer_blocks_0_attn_to_q.alpha": torch.tensor(1.0),
          "lycoris_img_in.hada_w1_a": h[0], "lycoris_img_in.hada_w1_b": h[1], "lycoris_img_in.hada_w2_a": h[2],
          "lycoris_img_in.hada_w2_b": h[3], "lycoris_img_in.alpha": torch.tensor(6.0)}
    apply_loras(transformer, [LoraSpec(state_dict=sd, strength=0.5)])
    want = dict(base)
    want["transformer_blocks.0.attn.to_q.weight"] = base["transformer_blocks.0.attn.to_q.weight"] + \
        0.5 * (1.0 / 2) * torch.kron(w1, w2a @ w2b)
    want["img_in.weight"] = base["img_in.weight"] + 0.5 * (6.0 / 3) * ((h[0] @ h[1]) * (h[2] @ h[3]))
    assert_weights(transformer, want, atol=1e-5)
    remove_loras(transformer)
    assert torch.equal(transformer.state_dict()["img_in.weight"], base["img_in.weight"])


def test_adapter_wrapper_compiles_without_graph_breaks():
    import torch._dynamo as dynamo

    from firered_core.lora import LoraLinear

    torch.manual_seed(0)
    layer = LoraLinear(torch.nn.Linear(8, 8))
    layer.add(0.5, torch.randn(2, 8), torch.randn(8, 2))
    layer.add(-1.0, None, torch.randn(8, 8))
    explanation = dynamo.explain(layer)(torch.randn(3, 8))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_spec_parse():
    assert LoraSpec.parse("a/b.safetensors:0.5") == LoraSpec(path="a/b.safetensors", strength=0.5)
    assert LoraSpec.parse("x.safetensors:-1") == LoraSpec(path="x.safetensors", strength=-1.0)
    assert LoraSpec.parse("C:/loras/x.safetensors") == LoraSpec(path="C:/loras/x.safetensors")
    assert lora_state_dict({"img_in": LoraWeights(torch.ones(1, 2), torch.ones(3, 1), 2.0)}, "diffusers")[
        "transformer.img_in.lora_B.weight"].eq(2.0).all()
