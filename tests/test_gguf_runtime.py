"""Runtime GGUF: torch kernels bit-exact to gguf's numpy reference, packed layers equal to dequantise-at-load,
memory ~ the file size, LoRA adapters on packed layers, and merge refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from firered_core.formats import GGUFLinear, load_single_file
from firered_core.formats.gguf import BLOCKS, dequantize
from firered_core.lora import LoraError, LoraSpec, apply_loras, lora_state_dict, remove_loras
from firered_core.memory import weight_bytes
from test_formats import _write_gguf, run, transformer  # noqa: F401  (module fixture)
from test_lora import make_weights


@pytest.mark.parametrize("qtype", sorted(BLOCKS), ids=[BLOCKS[q][0] for q in sorted(BLOCKS)])
def test_kernel_is_bit_exact_to_numpy_on_random_bytes(qtype):
    import gguf

    name, size, nbytes = BLOCKS[qtype]
    qt = gguf.GGMLQuantizationType(qtype)
    assert qt.name == name and gguf.GGML_QUANT_SIZES[qt] == (size, nbytes)
    raw = np.random.default_rng(qtype).integers(0, 256, size=(5, 3 * nbytes), dtype=np.uint8)
    with np.errstate(all="ignore"):
        ref = gguf.quants.dequantize(raw, qt)
    got = dequantize(torch.from_numpy(raw), qtype, ref.shape).numpy()
    finite = np.isfinite(ref)
    assert finite.mean() > 0.5
    assert np.array_equal(np.isnan(ref), np.isnan(got))
    assert np.array_equal(ref[finite].view(np.uint32), got[finite].view(np.uint32))


@pytest.fixture(scope="module")
def gguf_files(transformer, tmp_path_factory):  # noqa: F811
    import gguf

    out = tmp_path_factory.mktemp("gguf")
    files = {}
    for name in ("Q8_0", "Q4_0"):
        files[name] = out / f"{name}.gguf"
        _write_gguf(transformer.state_dict(), files[name], getattr(gguf.GGMLQuantizationType, name))
    return files


@pytest.mark.parametrize("qname", ["Q8_0", "Q4_0"])
def test_runtime_equals_load_and_holds_the_file_size(transformer, gguf_files, qname):  # noqa: F811
    path = gguf_files[qname]
    runtime = load_single_file("transformer", path, torch.float32)
    loaded = load_single_file("transformer", path, torch.float32, gguf_mode="load")
    packed = [m for m in runtime.modules() if isinstance(m, GGUFLinear)]
    plain = [m for m in loaded.modules() if isinstance(m, torch.nn.Linear)]
    assert packed and len(packed) == len(plain) and {m.qtype_name for m in packed} == {qname}
    assert not any(isinstance(m, GGUFLinear) for m in loaded.modules())
    assert (run(runtime) - run(loaded)).abs().max() <= 1e-6
    file_bytes, fp32_bytes = path.stat().st_size, weight_bytes(transformer)
    assert weight_bytes(loaded) == fp32_bytes
    assert weight_bytes(runtime) <= file_bytes < fp32_bytes * (0.3 if qname == "Q8_0" else 0.17)


def test_packed_layer_follows_dtype_and_device_moves(gguf_files):
    runtime = load_single_file("transformer", gguf_files["Q8_0"], torch.float32)
    layer = next(m for m in runtime.modules() if isinstance(m, GGUFLinear))
    x = torch.randn(3, layer.in_features)
    want = torch.nn.functional.linear(x.bfloat16(), layer.dequantize(torch.float32).bfloat16(), layer.bias.bfloat16())
    layer.to(torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16 and layer.qweight.dtype == torch.uint8
    assert torch.equal(layer(x.bfloat16()), want)


def test_lora_adapter_on_packed_layers_equals_adapter_on_dequantised(gguf_files):
    runtime = load_single_file("transformer", gguf_files["Q4_0"], torch.float32)
    loaded = load_single_file("transformer", gguf_files["Q4_0"], torch.float32, gguf_mode="load")
    base = run(runtime)
    spec = LoraSpec(state_dict=lora_state_dict(make_weights(loaded), "comfy"), strength=0.7, name="style")
    report = apply_loras(runtime, [spec], mode="adapter")
    apply_loras(loaded, [spec], mode="merge")
    assert report.matched and not report.unmatched
    out = run(runtime)
    assert not torch.equal(out, base)
    assert (out - run(loaded)).abs().max() <= 1e-5
    remove_loras(runtime)
    assert torch.equal(run(runtime), base)


def test_lora_merge_into_packed_layers_is_refused_by_name(gguf_files):
    runtime = load_single_file("transformer", gguf_files["Q8_0"], torch.float32)
    base = run(runtime)
    spec = LoraSpec(state_dict=lora_state_dict(make_weights(runtime), "kohya"), name="lightning")
    with pytest.raises(LoraError, match=r"lightning.*cannot merge.*Q8_0.*transformer_blocks\.0\.attn\.to_q.*adapter"):
        apply_loras(runtime, [spec], mode="merge")
    assert torch.equal(run(runtime), base)
    assert isinstance(runtime.transformer_blocks[0].attn.to_q, GGUFLinear)


def test_gguf_mode_is_threaded_through_load_model(gguf_files):
    from firered_core.model import load_model

    for mode, kind in (("runtime", GGUFLinear), ("load", torch.nn.Linear)):
        model = load_model(None, gguf_mode=mode, transformer=gguf_files["Q8_0"])
        assert isinstance(model.transformer.transformer_blocks[0].attn.to_q, kind)
    with pytest.raises(ValueError, match="gguf_mode"):
        load_model(None, gguf_mode="lazy", transformer=gguf_files["Q8_0"])
