"""FireRed components inside ComfyUI's memory manager (issue 9, point 2), through the contract of
``nodes/_comfy.py``'s :class:`ManagedPlacement` with the plain stand-in of ComfyUI's manager: every large component
is registered when it runs, loading ours frees other models when memory is short, unloading all (ComfyUI's Unload
Models / POST /free) sends ours off the device, a transformer too large for the free memory runs with block swap
(same pixels) after a log line, and a model nobody holds any more is freed (Free model and node cache). The real
ComfyUI run of the same contract is scripts/comfyui_memory_proof.py."""

from __future__ import annotations

import gc
import logging
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import nodes_support as S  # noqa: E402
from conftest import random_image  # noqa: E402

from firered_core.memory import is_block_swapped, weight_bytes
from firered_core.model import load_model
from firered_core.pipeline import EditPipeline
from firered_core.speed import ModelSettings

EDIT = dict(prompt="make it red", steps=2, seed=3, width=64, height=48, vl_area=56 * 56, vae_area=64 * 64)


def edit(model) -> np.ndarray:
    return np.asarray(EditPipeline(model).edit([random_image(64, 48, seed=5)], **EDIT).images[0])


@pytest.fixture(scope="module")
def plain_pixels(tiny_model_dir) -> np.ndarray:
    return edit(load_model(tiny_model_dir))


def managed(tiny_model_dir, budget=None, offload="none"):
    comfy = S.submodule("_comfy")
    manager = comfy.PlainMemoryManager(budget)
    model = load_model(tiny_model_dir, offload=offload, settings=ModelSettings(embed_cache=False))
    model.placement = comfy.ManagedPlacement(manager)
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
    comfy = S.submodule("_comfy")
    model, manager = managed(tiny_model_dir)
    transformer = model.get("transformer")
    other = comfy.holder_for("other", torch.nn.Linear(64, 64), torch.device("cpu"))  # one of ComfyUI's own models
    manager.budget = int(weight_bytes(transformer) * comfy.FREE_MARGIN) + weight_bytes(other) // 2
    manager.load(other)
    with model.use("transformer"):
        assert [type(h).__name__ for h in manager.loaded] == ["FireRedTransformer"]


def test_offload_model_hands_each_component_back_after_it_ran(tiny_model_dir, plain_pixels):
    model, manager = managed(tiny_model_dir, offload="model")
    np.testing.assert_array_equal(edit(model), plain_pixels)
    assert manager.loaded == []


def test_transformer_larger_than_free_memory_runs_with_block_swap(tiny_model_dir, plain_pixels, caplog):
    comfy = S.submodule("_comfy")
    probe = load_model(tiny_model_dir).get("transformer")
    blocks = list(probe.transformer_blocks)
    rest = weight_bytes(probe) - sum(weight_bytes(b) for b in blocks)
    budget = int((rest + weight_bytes(blocks[0]) * 1.5) * comfy.FREE_MARGIN)  # room for one block, not two
    model, manager = managed(tiny_model_dir, budget=budget)
    with caplog.at_level(logging.WARNING):
        pixels = edit(model)
    assert is_block_swapped(model.get("transformer"))
    assert "does not fit" in caplog.text and "block swap (1 of 2 blocks resident)" in caplog.text
    np.testing.assert_array_equal(pixels, plain_pixels)
    assert "FireRedTransformer" not in {type(h).__name__ for h in manager.loaded}


def test_unreferenced_model_is_freed_with_the_node_cache(tiny_model_dir, monkeypatch):
    loaders = S.submodule("loaders")
    monkeypatch.setenv("FIRERED_MODEL_DIRS", str(tiny_model_dir.parent))
    model = S.classes()["FireRedModelLoader"]().load(tiny_model_dir.name, "fp32", "cpu", "none")[0]
    assert model in loaders._cache.values()
    del model  # ComfyUI's "Free model and node cache" drops the node outputs holding it
    gc.collect()
    assert not any(m.root == tiny_model_dir for m in loaders._cache.values())
