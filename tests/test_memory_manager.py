"""FireRed components inside ComfyUI's memory manager (issue 9, point 2), through the contract of
``firered_core.memory.managed``'s :class:`ManagedPlacement` with the plain stand-in of ComfyUI's manager: every large component
is registered when it runs, loading ours frees other models when memory is short, unloading all (ComfyUI's Unload
Models / POST /free) sends ours off the device, and a model nobody holds any more is freed (Free model and node cache).

Below a planted budget each component falls back after a log line with the resident run's outputs (pixels equal,
prompt embeddings bit-equal): the transformer with block swap, the text encoder with its decoder layers streamed or on
the offload device, the VAE tiled or on the offload device; after the run nothing of ours is hooked and every weight
is back in the storage it had. A budget above the component keeps it resident. With ComfyUI
(``FIRERED_COMFYUI_DIR`` / ``FIRERED_COMFYUI_PYTHON``) the same runs inside its own ``model_management``; the server
run of the contract is scripts/comfyui_memory_proof.py."""

from __future__ import annotations

import gc
import logging
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import nodes_support as S  # noqa: E402
from conftest import random_image  # noqa: E402

from firered_core.memory import (OnDevice, fit_resident, is_block_swapped, move_tensors, text_encoder_layers,
                                  weight_bytes)
from firered_core.memory import managed as M
from firered_core.model import load_model
from firered_core.pipeline import EditPipeline, encode_instructions
from firered_core.references import prepare_references
from firered_core.speed import ModelSettings

EDIT = dict(prompt="make it red", steps=2, seed=3, width=64, height=48, vl_area=56 * 56, vae_area=64 * 64)


def edit(model) -> np.ndarray:
    return np.asarray(EditPipeline(model).edit([random_image(64, 48, seed=5)], **EDIT).images[0])


@pytest.fixture(scope="module")
def plain_pixels(tiny_model_dir) -> np.ndarray:
    return edit(load_model(tiny_model_dir))


def managed(tiny_model_dir, budget=None, offload="none"):
    manager = M.PlainMemoryManager(budget)
    model = load_model(tiny_model_dir, offload=offload, settings=ModelSettings(embed_cache=False))
    model.placement = M.ManagedPlacement(manager)
    return model, manager


def test_components_are_registered_and_unloaded_on_free(tiny_model_dir, plain_pixels):
    model, manager = managed(tiny_model_dir)
    np.testing.assert_array_equal(edit(model), plain_pixels)
    names = sorted(type(h).__name__ for h in manager.loaded)
    assert names == ["FireRedTextEncoder", "FireRedTransformer", "FireRedVAE"]
    assert {id(h.inner) for h in manager.loaded} == {id(m) for m in model.loaded_components().values()}
    manager.unload_all()  # what ComfyUI's Unload Models / POST /free does to every model it knows
    assert manager.loaded == []
    np.testing.assert_array_equal(edit(model), plain_pixels)  # reloaded on next use
    assert len(manager.loaded) == 3


def test_loading_ours_frees_other_models_first(tiny_model_dir):
    model, manager = managed(tiny_model_dir)
    transformer = model.get("transformer")
    other = M.holder_for("other", torch.nn.Linear(64, 64), torch.device("cpu"))  # one of ComfyUI's own models
    manager.budget = int(weight_bytes(transformer) * M.FREE_MARGIN) + weight_bytes(other) // 2
    manager.load(other)
    with model.use("transformer"):
        assert [type(h).__name__ for h in manager.loaded] == ["FireRedTransformer"]


def test_offload_model_hands_each_component_back_after_it_ran(tiny_model_dir, plain_pixels):
    model, manager = managed(tiny_model_dir, offload="model")
    np.testing.assert_array_equal(edit(model), plain_pixels)
    assert manager.loaded == []


def hooks(module: torch.nn.Module) -> int:
    """Forward hooks of ours on ``module`` (transformers adds its own output-recording hooks on a first run)."""
    return sum(getattr(h, "__module__", "").startswith("firered_core") for m in module.modules()
               for h in [*m._forward_pre_hooks.values(), *m._forward_hooks.values()])


def storage(module: torch.nn.Module) -> dict[str, tuple[str, int]]:
    """Where every weight lives (device and storage address): equal before and after a run = put back in place."""
    return {n: (str(t.device), t.data_ptr()) for n, t in [*module.named_parameters(), *module.named_buffers()]}


def assert_put_back(module: torch.nn.Module, before: dict) -> None:
    assert hooks(module) == 0 and not is_block_swapped(module) and not getattr(module, "use_tiling", False)
    assert storage(module) == before


@pytest.fixture(scope="module")
def deep_parts():
    """The tiny architecture with 4 transformer blocks and 4 decoder layers (2 leave nothing to keep resident)."""
    from firered_core import demo_models as D

    D.PRESETS["tiny4"] = replace(D.PRESETS["tiny"], layers=4, text_layers=4)
    try:
        return D.build_components("tiny4")
    finally:
        del D.PRESETS["tiny4"]


def deep_model(tiny_model_dir, deep_parts, budget=None):
    model, manager = managed(tiny_model_dir, budget)
    model.set("transformer", deep_parts["transformer"])
    model.set("text_encoder", deep_parts["text_encoder"])
    return model, manager


def need(name: str, module: torch.nn.Module) -> int:
    return int(weight_bytes(module) * M.FREE_MARGIN)


def fit_budget(module: torch.nn.Module, blocks, resident: int) -> int:
    """The budget that leaves room for the rest of ``module``, ``resident`` blocks and two streamed in flight."""
    sizes = [weight_bytes(b) for b in blocks]
    rest = weight_bytes(module) - sum(sizes)
    return int((rest + sum(sizes[:resident + 2])) * M.FREE_MARGIN) + 1


def test_fit_resident_counts_the_rest_and_two_blocks_in_flight():
    assert fit_resident(100 + 40, [10] * 4, 160) == 4
    assert fit_resident(100 + 40, [10] * 4, 139) == 1  # rest 100 + 1 resident + 2 in flight = 130; 2 would be 140
    assert fit_resident(100 + 40, [10] * 4, 120) == 0
    assert fit_resident(100 + 40, [10] * 4, 119) is None


def test_move_tensors_reaches_every_tensor_of_a_result():
    """What OnDevice moves back (here to the meta device, the one other device every machine has): nested
    containers, a model output and the VAE's latent distribution inside it, copied, the originals left alone."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.models.modeling_outputs import AutoencoderKLOutput

    out = AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(torch.zeros(1, 32, 1, 2, 2)))
    moved = move_tensors(({"a": torch.zeros(1)}, [out, 3]), torch.device("meta"))
    assert moved[0]["a"].is_meta and isinstance(moved[1][0], AutoencoderKLOutput) and moved[1][1] == 3
    assert moved[1][0].latent_dist.mode().is_meta and moved[1][0]["latent_dist"].std.is_meta
    assert not out.latent_dist.mean.is_meta


def test_all_three_fall_back_below_their_size_with_the_same_pixels(tiny_model_dir, plain_pixels, caplog):
    """Every component over budget: the transformer block-swapped, the text encoder and the VAE (2 layers: nothing
    to stream) on the offload device; the edit's pixels are the resident run's, and nothing is left patched."""
    probe = load_model(tiny_model_dir)
    smallest = min(weight_bytes(probe.get(n)) for n in ("transformer", "text_encoder", "vae"))
    model, manager = managed(tiny_model_dir, budget=smallest - 1)
    before = {n: storage(model.get(n)) for n in ("transformer", "text_encoder", "vae")}
    with caplog.at_level(logging.WARNING):
        pixels = edit(model)
    np.testing.assert_array_equal(pixels, plain_pixels)
    assert "the transformer (" in caplog.text and "block swap (0 of 2 blocks resident" in caplog.text
    assert "the text encoder (" in caplog.text and "the vae (" in caplog.text
    assert caplog.text.count("not even with its decoder layers streamed; running it on cpu") == 2  # prompt, negative
    assert len(re.findall(r"the vae \(2\.5 MB\) does not fit in the 0\.8 MB free on cpu; running it on cpu",
                          caplog.text)) == 2  # references encoded, result decoded
    for name, module in model.loaded_components().items():
        assert_put_back(module, before[name])
    assert manager.loaded == [] and model.placement.undo == {}


def test_text_encoder_streams_its_decoder_layers_with_equal_embeddings(tiny_model_dir, deep_parts, caplog):
    te = deep_parts["text_encoder"]
    layers = text_encoder_layers(te)
    assert len(layers) == 4 and text_encoder_layers(deep_parts["vae"]) is None  # nothing to stream: offload device
    refs = prepare_references([random_image(64, 48, seed=5)], 56 * 56, 64 * 64)
    resident, manager = deep_model(tiny_model_dir, deep_parts)
    plain = encode_instructions(resident, ["make it red", " "], refs).embeds
    before = storage(te)
    for budget, line, streamed in [
            (fit_budget(te, layers, 1), "block swap (1 of 4 decoder layers resident", 3),
            (fit_budget(te, layers, 0), "block swap (0 of 4 decoder layers resident", 4),
            (fit_budget(te, layers, 0) - 2, "not even with its decoder layers streamed; running it on cpu", 0)]:
        model, manager = deep_model(tiny_model_dir, deep_parts, budget)
        caplog.clear()
        with caplog.at_level(logging.WARNING), model.use("text_encoder") as running:
            assert hooks(te) == 2 * streamed and is_block_swapped(te) == bool(streamed)
            assert (running is te) == bool(streamed)  # else a view that runs it on the offload device
        assert line in caplog.text and "the text encoder (" in caplog.text, caplog.text
        assert_put_back(te, before)
        with caplog.at_level(logging.WARNING):
            embeds = encode_instructions(model, ["make it red", " "], refs).embeds
        assert torch.equal(embeds, plain), (budget, float((embeds - plain).abs().max()))
        assert_put_back(te, before)
        assert manager.loaded == []


def test_text_encoder_within_budget_stays_resident(tiny_model_dir, deep_parts, caplog):
    te = deep_parts["text_encoder"]
    model, manager = deep_model(tiny_model_dir, deep_parts, need("text_encoder", te))
    with caplog.at_level(logging.WARNING), model.use("text_encoder") as running:
        assert running is te and hooks(te) == 0
    assert "does not fit" not in caplog.text
    assert [type(h).__name__ for h in manager.loaded] == ["FireRedTextEncoder"]


def budgets_per_component(model, manager) -> dict[str, int]:
    """Planted budgets by component name, read as each component is acquired (one absent: unlimited memory)."""
    acquire, budgets = model.placement.acquire, {}

    def planted(m, component, module):
        manager.budget = budgets.get(component)
        return acquire(m, component, module)
    model.placement.acquire = planted
    return budgets


def test_transformer_keeps_the_blocks_that_fit_resident(tiny_model_dir, deep_parts, caplog):
    tr = deep_parts["transformer"]
    plain = edit(deep_model(tiny_model_dir, deep_parts)[0])
    before = storage(tr)
    model, manager = deep_model(tiny_model_dir, deep_parts)
    budgets = budgets_per_component(model, manager)
    budgets["transformer"] = fit_budget(tr, tr.transformer_blocks, 1)
    with caplog.at_level(logging.WARNING):
        pixels = edit(model)
    assert "block swap (1 of 4 blocks resident" in caplog.text and caplog.text.count("does not fit") == 1
    np.testing.assert_array_equal(pixels, plain)
    assert_put_back(tr, before)
    assert "FireRedTransformer" not in {type(h).__name__ for h in manager.loaded}
    budgets["transformer"] = need("transformer", tr)  # room again: resident, and known to the manager
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(edit(model), plain)
    assert "does not fit" not in caplog.text and "FireRedTransformer" in {type(h).__name__ for h in manager.loaded}


def test_vae_tiles_when_only_its_weights_fit_and_runs_on_the_offload_device_below(tiny_model_dir, plain_pixels,
                                                                                   caplog):
    """Pixels equal: the test pictures are smaller than one tile, so tiling is exact here (larger ones are blended
    across tile seams, as ComfyUI's own tiled VAE decode)."""
    vae = load_model(tiny_model_dir).get("vae")
    size = weight_bytes(vae)
    for budget, line, tiled in [(need("vae", vae), None, False), (size, "decoding / encoding it in tiles", True),
                                (size - 1, "; running it on cpu (slow)", False)]:
        model, manager = managed(tiny_model_dir)
        budgets_per_component(model, manager)["vae"] = budget
        vae = model.get("vae")
        before = storage(vae)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            with model.use("vae") as running:
                assert bool(vae.use_tiling) == tiled and isinstance(running, OnDevice) == (budget < size)
            pixels = edit(model)
        assert (line in caplog.text) if line else "does not fit" not in caplog.text, caplog.text
        np.testing.assert_array_equal(pixels, plain_pixels)
        assert_put_back(vae, before)
        assert ("FireRedVAE" in {type(h).__name__ for h in manager.loaded}) == (budget >= size)


def test_vae_that_runs_out_of_memory_retries_in_tiles(tiny_model_dir, plain_pixels, caplog, monkeypatch):
    """A planted out-of-memory error in the first untiled decode and encode: each runs again tiled, after a log
    line, with the same pixels, and the VAE is untiled after; one while tiled already is the caller's."""
    model, manager = managed(tiny_model_dir)
    vae = model.get("vae")
    failed = []

    def once(fn):
        def run(*args, **kwargs):
            if fn.__name__ not in failed and not vae.use_tiling:
                failed.append(fn.__name__)
                raise torch.OutOfMemoryError("planted")
            return fn(*args, **kwargs)
        run.__name__ = fn.__name__
        return run
    monkeypatch.setattr(vae, "_decode", once(vae._decode))
    monkeypatch.setattr(vae, "_encode", once(vae._encode))
    with caplog.at_level(logging.WARNING):
        pixels = edit(model)
    assert sorted(failed) == ["_decode", "_encode"]
    assert caplog.text.count("the VAE ran out of memory on cpu; retrying it in tiles") == 2
    np.testing.assert_array_equal(pixels, plain_pixels)
    assert vae.use_tiling is False
    monkeypatch.setattr(vae, "_decode", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("planted")))
    with pytest.raises(torch.OutOfMemoryError), model.use("vae") as running:
        running.decode(torch.zeros(1, 16, 1, 4, 4))
    assert vae.use_tiling is False


def test_unreferenced_model_is_freed_with_the_node_cache(tiny_model_dir, monkeypatch):
    loaders = S.submodule("loaders")
    monkeypatch.setenv("FIRERED_MODEL_DIRS", str(tiny_model_dir.parent))
    model = S.classes()["FireRedModelLoader"]().load(tiny_model_dir.name, "fp32", "cpu", "none")[0]
    assert model in loaders._cache.values()
    del model  # ComfyUI's "Free model and node cache" drops the node outputs holding it
    gc.collect()
    assert not any(m.root == tiny_model_dir for m in loaders._cache.values())


COMFY_DIR = os.environ.get("FIRERED_COMFYUI_DIR", "")
COMFY_PY = os.environ.get("FIRERED_COMFYUI_PYTHON", "")
COMFY_SCRIPT = r'''
import importlib.util, logging, sys, tempfile
comfy_dir, pack, tiny = sys.argv[1:4]
sys.argv = [sys.argv[0], "--cpu"]
sys.path[:0] = [comfy_dir, pack]
import comfy.options
comfy.options.enable_args_parsing()
import numpy as np
import torch
import folder_paths
folder_paths.set_input_directory(tempfile.mkdtemp())
import comfy.model_management as mm
spec = importlib.util.spec_from_file_location("firered_pack", pack + "/__init__.py", submodule_search_locations=[pack])
mod = importlib.util.module_from_spec(spec); sys.modules["firered_pack"] = mod; spec.loader.exec_module(mod)
C = sys.modules["firered_pack.nodes._memory"]
assert sys.modules["firered_pack.nodes._comfy"].IN_COMFY
from PIL import Image
from firered_core.memory import weight_bytes
from firered_core.model import load_model
from firered_core.pipeline import EditPipeline
from firered_core.speed import ModelSettings
lines = []
class Lines(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())
logging.getLogger("firered_core.memory.managed").addHandler(Lines())
planted = {"bytes": None}  # the CPU has no VRAM count: the free memory ComfyUI reports is planted here
C.ComfyMemoryManager.free_bytes = lambda self, device: planted["bytes"]
image = Image.fromarray((np.random.RandomState(5).rand(48, 64, 3) * 255).astype(np.uint8))
def edit(model):
    return np.asarray(EditPipeline(model).edit([image], "make it red", steps=2, seed=3, width=64, height=48,
                                               vl_area=56 * 56, vae_area=64 * 64).images[0])
def ours(model):
    return sum(getattr(h, "__module__", "").startswith("firered_core") for c in model.loaded_components().values()
               for m in c.modules() for h in [*m._forward_pre_hooks.values(), *m._forward_hooks.values()])
def listed():
    return sorted(type(m.model.model).__name__ for m in mm.current_loaded_models if m.model is not None)
model = load_model(tiny, settings=ModelSettings(embed_cache=False))
model.placement = C.placement()
plain = edit(model)
print("resident", listed(), ours(model))
planted["bytes"] = min(weight_bytes(model.get(n)) for n in ("transformer", "text_encoder", "vae")) - 1
small = edit(model)
print("fallback", listed(), ours(model), int(np.abs(small.astype(int) - plain).max()), len(lines))
planted["bytes"] = None
again = edit(model)
print("again", listed(), ours(model), int(np.abs(again.astype(int) - plain).max()))
mm.unload_all_models()
print("unloaded", listed())
'''


@pytest.mark.skipif(not (Path(COMFY_DIR, "comfy", "model_management.py").is_file() and Path(COMFY_PY).is_file()),
                    reason="needs ComfyUI: FIRERED_COMFYUI_DIR (source) and FIRERED_COMFYUI_PYTHON (its venv's Python)")
def test_fallbacks_inside_comfyuis_own_memory_manager(tiny_model_dir, tmp_path):
    """ComfyUI's model_management and ModelPatcher: resident components are listed, components over a planted free
    memory fall back (not listed, same pixels), and after it nothing of ours is hooked and ComfyUI loads and unloads
    them as before."""
    out = subprocess.run([COMFY_PY, "-c", COMFY_SCRIPT, COMFY_DIR, str(S.ROOT), str(tiny_model_dir)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in out.stdout.splitlines()
            if line.startswith(("resident", "fallback", "again", "unloaded"))}
    three = "['FireRedTextEncoder', 'FireRedTransformer', 'FireRedVAE']"
    assert rows["resident"] == f"{three} 0"
    assert rows["fallback"] == "[] 0 0 5", rows  # 2 text encoder runs, 2 VAE runs, 1 transformer run
    assert rows["again"] == f"{three} 0 0"
    assert rows["unloaded"] == "[]"
