"""Every shipped workflow, converted from the UI format through the nodes' widget order and executed as ComfyUI
orders it, on the tiny model; the single-image edit equals the headless pipeline for the same settings."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import nodes_support as S  # noqa: E402

WORKFLOWS = sorted((S.ROOT / "workflows").glob("*.json"))
# Small sizes for speed: these tests are about the graphs, not the default sizes.
FAST = {"FireRedSampler": {"steps": 2}, "FireRedReferenceImages": {"vl_size": 56, "vae_size": 64},
        "FireRedImageSize": {"megapixels": 0.01, "width": 40, "height": 24},
        "FireRedPackPictures": {"megapixels": 0.05}}


@pytest.fixture
def graph_env(tiny_model_dir, tmp_path, monkeypatch, make_image):
    """Model names a workflow asks for resolve to the tiny model, LoRA names to a LoRA written from it; every
    LoadImage gets a picture."""
    loras = tmp_path / "loras"
    monkeypatch.setenv("FIRERED_LORA_DIRS", str(loras))

    def prepare(workflow: dict, size=(48, 32)) -> dict:
        for node in workflow["nodes"]:
            if node["type"] == "FireRedModelLoader":
                link = tmp_path / node["widgets_values"][0]
                if not link.exists():
                    link.symlink_to(tiny_model_dir, target_is_directory=True)
            if node["type"] == "FireRedLoraLoader" and not (loras / node["widgets_values"][0]).exists():
                S.write_lora(tiny_model_dir, loras / node["widgets_values"][0], seed=node["id"])
            if node["type"] == "LoadImage":
                S.LoadImage.pictures[node["widgets_values"][0]] = make_image(*size, seed=node["id"])
        monkeypatch.setenv("FIRERED_MODEL_DIRS", str(tmp_path))
        return S.ui_to_api(workflow, S.object_info())

    S.SaveImage.saved.clear()
    S.PreviewAny.shown.clear()
    return prepare


def fast(api: dict) -> dict:
    for node in api.values():
        for key, value in FAST.get(node["class_type"], {}).items():
            node["inputs"][key] = value
    return api


def test_every_required_workflow_is_shipped():
    names = {p.name for p in WORKFLOWS}
    assert {"single_image_edit.json", "three_image_composition.json", "text_to_image.json", "seed_sweep.json",
            "exact_size_edit.json", "lora_edit.json", "FireRed - Edit inside a mask.json",
            "FireRed - Combine more than three pictures.json"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_ui_format_with_model_note(path):
    wf = json.loads(path.read_text())
    assert {"nodes", "links", "last_node_id", "last_link_id"} <= set(wf)
    notes = [n for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes and "models/firered" in notes[0]["widgets_values"][0]
    ids = {n["id"] for n in wf["nodes"]}
    for link_id, src, _slot, dst, _dslot, _type in wf["links"]:
        assert src in ids and dst in ids
    known = S.object_info()
    assert all(n["type"] in known or n["type"] in S.UI_ONLY for n in wf["nodes"])


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs(path, graph_env):
    wf = json.loads(path.read_text())
    api = fast(graph_env(wf))
    S.execute(api)
    assert S.SaveImage.saved, "no image saved"
    images = S.SaveImage.saved[-1]
    sampler = next(n for n in api.values() if n["class_type"] == "FireRedSampler")
    assert images.shape[0] == sampler["inputs"]["batch_size"]
    if path.stem == "exact_size_edit":
        assert images.shape[1:3] == (32, 48)
    if path.stem == "seed_sweep":
        assert images.shape[0] == 4 and not np.allclose(images[0].numpy(), images[1].numpy())
    if path.stem == "lora_edit":
        assert "12/12 keys matched" in S.PreviewAny.shown[-1]
        note = next(n for n in wf["nodes"] if n["type"] == "Note")["widgets_values"][0]
        assert "models/loras" in note


def test_exact_size_workflow_keeps_odd_input_size(graph_env):
    wf = json.loads((S.ROOT / "workflows" / "exact_size_edit.json").read_text())
    S.execute(fast(graph_env(wf, size=(37, 23))))
    assert S.SaveImage.saved[-1].shape == (1, 23, 37, 3)


def test_masked_workflow_keeps_every_pixel_outside_the_painted_mask(graph_env):
    """A mask painted on an odd-sized picture (as LoadImage gives it: 1 = painted), grown by Grow Mask: outside the
    grown mask the saved image is the input's own 8-bit pixels; inside it changed."""
    wf = json.loads((S.ROOT / "workflows" / "FireRed - Edit inside a mask.json").read_text())
    api = fast(graph_env(wf, size=(37, 23)))
    load = next(n for n in api.values() if n["class_type"] == "LoadImage")["inputs"]["image"]
    painted = torch.zeros(23, 37)
    painted[6:14, 12:24] = 1
    S.LoadImage.masks[load] = painted
    try:
        S.execute(api)
    finally:
        S.LoadImage.masks.clear()
    grow = next(n for n in api.values() if n["class_type"] == "GrowMask")["inputs"]["expand"]
    grown = S.GrowMask().expand_mask(painted[None], grow, True)[0][0].numpy() > 0
    out = (S.SaveImage.saved[-1][0].numpy() * 255).round().astype(np.uint8)
    src = np.asarray(S.LoadImage.pictures[load])
    assert out.shape == src.shape == (23, 37, 3)
    np.testing.assert_array_equal(out[~grown], src[~grown])
    assert (out[grown] != src[grown]).mean() > 0.5


def test_five_picture_workflow_packs_and_rewrites_the_instruction(graph_env):
    from firered_core import packing

    wf = json.loads((S.ROOT / "workflows" / "FireRed - Combine more than three pictures.json").read_text())
    api = fast(graph_env(wf))
    results = S.execute(api)
    pack_id = next(k for k, n in api.items() if n["class_type"] == "FireRedPackPictures")
    composites = [c for c in results[pack_id][:3] if c is not None]
    assert len(composites) == 3  # auto: 3 composites for 5 pictures
    original = api[pack_id]["inputs"]["prompt"]
    rewritten, table = results[pack_id][3:]
    assert packing.mentions(original) == [4, 5, 1, 2, 3] and "Picture 4" not in rewritten
    assert "Picture 3" in rewritten and table in S.PreviewAny.shown
    encode = next(k for k, n in api.items() if n["class_type"] == "FireRedEncodeInstruction"
                  and n["inputs"]["prompt"] == [pack_id, 3])
    assert results[encode][0].prompt == rewritten


def test_single_image_workflow_equals_headless_pipeline(graph_env, tiny_model_dir):
    from firered_core.model import load_model
    from firered_core.pipeline import EditPipeline

    wf = json.loads((S.ROOT / "workflows" / "single_image_edit.json").read_text())
    api = fast(graph_env(wf))
    results = S.execute(api)
    nodes = {n["class_type"]: n["inputs"] for n in api.values()}
    _, _, width, height = next(results[k] for k, n in api.items() if n["class_type"] == "FireRedImageSize")
    sampler, refs = nodes["FireRedSampler"], nodes["FireRedReferenceImages"]
    prompts = [n["inputs"]["prompt"] for n in api.values() if n["class_type"] == "FireRedEncodeInstruction"]
    picture = S.LoadImage.pictures[nodes["LoadImage"]["image"]]

    expected = EditPipeline(load_model(tiny_model_dir)).edit(
        [picture], prompts[0], negative_prompt=prompts[1], steps=sampler["steps"], true_cfg=sampler["true_cfg"],
        seed=sampler["seed"], width=width, height=height, vl_area=refs["vl_size"] ** 2,
        vae_area=refs["vae_size"] ** 2)
    got = (S.SaveImage.saved[-1][0].numpy() * 255).round().astype(np.uint8)
    assert got.shape == np.asarray(expected.images[0]).shape
    np.testing.assert_array_equal(got, np.asarray(expected.images[0]))
