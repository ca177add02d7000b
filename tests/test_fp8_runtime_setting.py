"""fp8_mode (a model-level speed setting): a ComfyUI fp8-scaled transformer file kept in fp8, reached from
ModelSettings, the CLI and FireRed Speed Settings -> Single-File Loader; on this CPU (no fp8 matmul) every fp8 layer
dequantises per call, logged once, and gives the dequantise-at-load path's result (identical weights, latents
within 1e-6). Also the Speed Settings node's attention widget reaching the attention processors."""

from __future__ import annotations

import logging
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import nodes_support as S  # noqa: E402
from speed_helpers import edit, fresh_model, max_diff  # noqa: E402
from test_nodes import lora_dir, model_dirs, single_file_dir  # noqa: E402,F401
from test_nodes_lora_speed import speed  # noqa: E402

from firered_core import cli  # noqa: E402
from firered_core.formats.convert import COMFY_FILE_NAMES  # noqa: E402
from firered_core.kernels.attention import attention_backend_of, sage_installed  # noqa: E402
from firered_core.memory import KEEP_TRANSFORMER, _kept, weight_bytes  # noqa: E402
from firered_core.quant import FastQuantLinear  # noqa: E402
from firered_core.quant.matmul import FP8  # noqa: E402
from firered_core.speed import ModelSettings, SettingsError  # noqa: E402

RUNTIME = ModelSettings(fp8_mode="runtime")


@pytest.fixture(scope="module")
def fp8_file(tiny_model_dir, tmp_path_factory):
    """The tiny transformer as a ComfyUI fp8-scaled single file (e4m3 matrices with a float32 scale_weight)."""
    from safetensors.torch import load_file, save_file
    from test_formats import _fp8_state

    state = {}
    for f in sorted((tiny_model_dir / "transformer").glob("*.safetensors")):
        state.update(load_file(f))
    folder = tmp_path_factory.mktemp("fp8-file")
    path = folder / "firered_fp8_scaled.safetensors"
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in _fp8_state(state, FP8, True).items()},
              str(path))
    return path


@pytest.fixture(scope="module")
def image():
    from conftest import random_image

    return random_image(64, 48)


def _fp8_layers(transformer) -> dict[str, FastQuantLinear]:
    return {n: m for n, m in transformer.named_modules() if isinstance(m, FastQuantLinear)}


@pytest.mark.parametrize("dtype, size", [("fp32", 4), ("bf16", 2)])
def test_setting_keeps_every_linear_fp8_with_no_full_precision_copy(tiny_model_dir, fp8_file, dtype, size):
    """Every Linear outside the kept layers holds only the file's fp8 tensor: the bytes saved are exactly the
    full-precision weights minus the per-row scales (``scale`` in the compute dtype, ``wscale`` in float32)."""
    loaded = fresh_model(tiny_model_dir, transformer=fp8_file, dtype=dtype).prepared("transformer")
    runtime = fresh_model(tiny_model_dir, RUNTIME, transformer=fp8_file, dtype=dtype).prepared("transformer")
    fast = _fp8_layers(runtime)
    linears = {n for n, m in loaded.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(fast) == {n for n in linears if not _kept(n, KEEP_TRANSFORMER)} and len(fast) > 20
    assert all(m.from_file and m.qweight.dtype == FP8 for m in fast.values())
    assert type(runtime.proj_out) is torch.nn.Linear
    saved = sum(m.out_features * m.in_features * (size - 1) - m.out_features * (size + 4) for m in fast.values())
    assert weight_bytes(loaded) - weight_bytes(runtime) == saved
    x = torch.randn(3, 5, runtime.inner_dim, generator=torch.Generator().manual_seed(0))
    x = x.to(runtime.proj_out.weight.dtype)
    for name, m in fast.items():  # the fallback multiplies the dequantise-at-load weight, bit for bit
        assert torch.equal(m.dequantized(m.compute_dtype), loaded.get_submodule(name).weight)
        if m.in_features == x.shape[-1]:
            assert torch.equal(m(x), loaded.get_submodule(name)(x)), name


def test_fallback_logs_once_and_gives_the_dequantised_path(tiny_model_dir, fp8_file, image, caplog):
    """No fp8 matmul on this CPU: one log line at prepare time, and the edit equals the dequantise-at-load edit
    (stated tolerance: max |latent difference| <= 1e-6; it is exact here)."""
    plain = edit(fresh_model(tiny_model_dir, transformer=fp8_file), image, steps=2).latents
    model = fresh_model(tiny_model_dir, RUNTIME, transformer=fp8_file)
    with caplog.at_level(logging.INFO, logger="firered_core.quant.linear"):
        model.prepared("transformer")
        out = edit(model, image, steps=2).latents
    lines = [r.getMessage() for r in caplog.records if r.name == "firered_core.quant.linear"]
    assert len(lines) == 1 and "fp8-weight layers dequantise" in lines[0] and "fp8 matmul unavailable" in lines[0]
    assert not any(m.fast_path(torch.device("cpu")) for m in _fp8_layers(model.transformer).values())
    assert max_diff(out, plain) <= 1e-6


def test_bad_values_are_refused(fp8_file, capsys):
    with pytest.raises(SettingsError, match="fp8_mode='bogus'") as err:
        ModelSettings(fp8_mode="bogus")
    assert err.value.field == "fp8_mode"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["-p", "x", "--fp8-mode", "bogus"])
    assert "--fp8-mode: invalid choice: 'bogus'" in capsys.readouterr().err
    with pytest.raises(S.submodule("_errors").NodeInputError, match="input 'fp8_mode'"):
        speed(fp8_mode="bogus")


def test_cli_flag_reaches_the_layers(tiny_model_dir, fp8_file):
    args = cli.build_parser().parse_args(["-p", "x", "--model", str(tiny_model_dir), "--transformer", str(fp8_file),
                                          "--fp8-mode", "runtime", "--device", "cpu"])
    model, _, speed_settings = cli.load_from_args(args)
    assert model.settings.fp8_mode == speed_settings.model.fp8_mode == "runtime"
    assert _fp8_layers(model.transformer)
    assert "--fp8-mode {load,runtime}" in cli.build_parser().format_help()


def test_node_setting_reaches_the_single_file_loader(model_dirs, fp8_file, monkeypatch, single_file_dir):
    """FireRed Speed Settings (fp8_mode runtime) -> FireRed Single-File Loader: the fp8 file stays fp8; a LoRA on it
    is refused naming fp8_mode (LoRAs go onto full-precision weights)."""
    monkeypatch.setenv("FIRERED_SINGLE_FILE_DIRS", os.pathsep.join([str(single_file_dir), str(fp8_file.parent)]))
    te, vae = COMFY_FILE_NAMES["text_encoder"], COMFY_FILE_NAMES["vae"]
    loader = S.classes()["FireRedSingleFileLoader"]()
    model = loader.load(fp8_file.name, te, vae, "fp32", "cpu", "none", speed=speed(fp8_mode="runtime"))[0]
    assert model.settings.fp8_mode == "runtime" and _fp8_layers(model.prepared("transformer"))
    plain = loader.load(fp8_file.name, te, vae, "fp32", "cpu", "none")[0]
    assert plain is not model and not _fp8_layers(plain.transformer)
    with pytest.raises(S.submodule("_errors").NodeInputError, match="LoRA Loader.*fp8_mode='load'"):
        S.classes()["FireRedLoraLoader"]().load(model, "a.safetensors", 0.8, "auto", False)


@pytest.mark.parametrize("backend", ["flash", "auto"])
def test_attention_widget_reaches_the_processors(model_dirs, backend):
    loader = S.classes()["FireRedModelLoader"]()
    model = loader.load(model_dirs.name, "fp32", "cpu", "none", speed=speed(attention=backend))[0]
    assert model.settings.attention == backend
    assert attention_backend_of(model.prepared("transformer")) == {"flash": "flash", "auto": "sdpa"}[backend]


@pytest.mark.skipif(sage_installed(), reason="checks the error shown when sageattention is absent")
def test_sage_without_its_package_is_a_clear_error(capsys):
    """Refused where it is chosen (the node input, the CLI flag), not at the first step: no silent fallback."""
    with pytest.raises(S.submodule("_errors").NodeInputError, match="input 'attention'.*pip install"):
        speed(attention="sage")
    assert cli.main(["-p", "x", "--attention", "sage"]) == 2
    assert "attention='sage' needs the sageattention package" in capsys.readouterr().err
