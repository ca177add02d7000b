"""Low-precision matmuls (firered_core.quant): int8 through torch._int_mm on this CPU against an exact integer
reference, fp8 scaling logic against a dequantised reference (the fp8 kernel itself needs compute capability 8.9,
measured by benchmarks/gpu.py), dispatch and fallback, and the ComfyUI fp8-scaled constructor."""

from __future__ import annotations

import pytest
import torch

from firered_core.memory import QuantLinear, quantize_linears
from firered_core.quant import (FP8_MAX, FastQuantLinear, fp8_matmul_supported, quantize_rows_fp8,
                                quantize_rows_int8, scaled_fp8_linear, scaled_int8_linear)
from firered_core.quant.matmul import FP8


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def fresh(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_row_quantisers_bound_the_error_per_row():
    x = fresh(0, 37, 64) * torch.logspace(-3, 3, 37).unsqueeze(1)  # rows of very different magnitude
    q, s = quantize_rows_int8(x)
    assert q.dtype == torch.int8 and s.shape == (37, 1) and int(q.abs().max()) == 127
    assert float(((q.float() * s - x).abs() / x.abs().amax(1, keepdim=True)).max()) <= 0.5 / 127 + 1e-6
    q, s = quantize_rows_fp8(x)
    assert q.dtype == FP8 and float(q.float().abs().amax(1).min()) == FP8_MAX
    # e4m3: 3 mantissa bits -> relative error <= 2**-4 on normal values
    back = q.float() * s
    normal = x.abs() > s * 2 ** -6
    assert float(((back - x).abs() / x.abs())[normal].max()) <= 2 ** -4 + 1e-6


def test_int8_kernel_equals_exact_integer_reference():
    """torch._int_mm accumulates in int32 exactly, so the CPU kernel equals the float64 emulation to rounding."""
    lin = torch.nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(fresh(1, 48, 64))
    layer = FastQuantLinear(lin, "int8")
    x = fresh(2, 3, 5, 64)
    assert layer.fast_path(x.device)
    fast = layer(x)
    ref = scaled_int8_linear(x, layer.qweight, layer.wscale, layer.bias, emulate=True)
    assert fast.shape == (3, 5, 48)
    assert torch.allclose(fast, ref, rtol=1e-6, atol=1e-6)
    assert rel(fast, lin(x)) < 0.02  # activation + weight quantisation against the float layer


def test_fp8_scaling_logic_matches_dequantised_reference():
    """The emulated fp8 path is exactly (dequantised activations) @ (dequantised weights).T, per-row scales applied
    on the right axes: a transposed or swapped scale would break the comparison on rows of different magnitude."""
    lin = torch.nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.copy_(fresh(3, 32, 64) * torch.logspace(-2, 2, 32).unsqueeze(1))
    layer = FastQuantLinear(lin, "fp8")
    x = fresh(4, 20, 64) * torch.logspace(-2, 2, 20).unsqueeze(1)
    xq, xs = quantize_rows_fp8(x)
    ref = (xq.double() * xs) @ (layer.qweight.double() * layer.wscale.t()).t() + lin.bias.double()
    out = scaled_fp8_linear(x, layer.qweight, layer.wscale, layer.bias, emulate=True)
    assert rel(out, ref) < 1e-6
    assert rel(out, lin(x)) < 0.08


def test_fast_layers_dispatch_and_fall_back():
    lin = torch.nn.Linear(64, 32)
    x = fresh(5, 4, 64)
    fp8 = FastQuantLinear(lin, "fp8")
    if not fp8_matmul_supported(x.device):
        assert not fp8.fast_path(x.device)
        assert torch.equal(fp8(x), QuantLinear.forward(fp8, x))  # the dequantise path of today
    odd = FastQuantLinear(torch.nn.Linear(60, 30), "int8")  # K, N not multiples of 8: the kernel refuses them
    assert not odd.fast_path(torch.device("cpu"))
    y = fresh(6, 4, 60)
    assert torch.equal(odd(y), QuantLinear.forward(odd, y))
    FastQuantLinear.emulate = True
    try:
        assert fp8.fast_path(x.device) and not torch.equal(fp8(x), QuantLinear.forward(fp8, x))
    finally:
        FastQuantLinear.emulate = False


def test_quantize_linears_mm_modes_and_loras_see_the_weight():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    assert quantize_linears(model, "int8_mm", keep=("2",)) == 1
    assert isinstance(model[0], FastQuantLinear) and model[0].mode == "int8"
    assert type(model[2]) is torch.nn.Linear
    assert model[0].weight.shape == (64, 64)
    with pytest.raises(ValueError):
        QuantLinear(torch.nn.Linear(8, 8), "int4")


def test_from_fp8_file_weight_has_no_full_precision_copy():
    """A ComfyUI fp8-scaled weight (per-tensor scale) becomes the layer's own buffer, not a bf16 copy."""
    w = (fresh(7, 32, 64) * 0.05)
    scale = float(w.abs().max()) / FP8_MAX
    stored = (w / scale).to(FP8)
    bias = fresh(8, 32)
    layer = FastQuantLinear.from_fp8(stored, torch.tensor([scale]), bias, torch.float32)
    assert layer.qweight.data_ptr() == stored.data_ptr()
    assert not any(t.dtype in (torch.float32, torch.bfloat16) and t.numel() == 32 * 64
                   for t in list(layer.buffers()) + list(layer.parameters()))
    x = fresh(9, 6, 64)
    dequant = torch.nn.functional.linear(x, stored.float() * scale, bias)
    assert rel(layer(x), dequant) < 1e-6  # the CPU fallback: exactly the dequantised file weight
    FastQuantLinear.emulate = True
    try:
        assert rel(layer(x), dequant) < 0.08
    finally:
        FastQuantLinear.emulate = False
    with pytest.raises(ValueError, match="needs 1 or 32 scales"):
        FastQuantLinear.from_fp8(stored, torch.ones(3), None, torch.float32)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        FastQuantLinear.from_fp8(w, 1.0, None, torch.float32)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_fast_layers_trace_without_graph_breaks(mode):
    """fullgraph=True: the dispatch (device capability, shape rules, padding) must not break the compiled graph."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    quantize_linears(model, f"{mode}_mm")
    FastQuantLinear.emulate = mode == "fp8"
    try:
        x = fresh(10, 3, 7, 64)
        expected = model(x)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        assert torch.allclose(compiled(x), expected, rtol=1e-6, atol=1e-6)
    finally:
        FastQuantLinear.emulate = False
        torch._dynamo.reset()


@pytest.mark.parametrize("scaled", [True, False])
def test_fp8_file_runtime_keeps_fp8_and_equals_load_on_cpu(tmp_path, scaled):
    """fp8_mode="runtime": the file's e4m3 tensors become the layers' weights (no full-precision copy of them);
    on this CPU the fallback computes exactly what dequantise-at-load computes (float32)."""
    from test_formats import _fp8_state, run, save

    from firered_core.formats import load_single_file
    from firered_core.memory import weight_bytes

    ref = _transformer_state()
    path = save({"model.diffusion_model." + k: v for k, v in _fp8_state(ref, FP8, scaled).items()},
                tmp_path / "fp8.safetensors")
    loaded = load_single_file("transformer", path, torch.float32)
    runtime = load_single_file("transformer", path, torch.float32, fp8_mode="runtime")
    fast = [m for m in runtime.modules() if isinstance(m, FastQuantLinear)]
    assert fast and all(m.qweight.dtype == FP8 for m in fast)
    assert type(runtime.proj_out) is torch.nn.Linear and type(runtime.img_in) is torch.nn.Linear  # kept layers
    assert weight_bytes(runtime) < 0.5 * weight_bytes(loaded)
    assert torch.allclose(run(runtime), run(loaded), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fp8_mode"):
        load_single_file("transformer", path, torch.float32, fp8_mode="bogus")


def _transformer_state() -> dict:
    from diffusers import QwenImageTransformer2DModel

    from firered_core.demo_models import _perturb_zero_inits, transformer_config

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**transformer_config("tiny")).eval()
    _perturb_zero_inits(model, 3)
    return {k: v.detach() for k, v in model.state_dict().items()}
