"""Every shipped workflow, converted from the UI format through the nodes' widget order and executed as ComfyUI
orders it, on the tiny model; the single-image edit equals the headless pipeline for the same settings."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
import nodes_support as S  # noqa: E402

WORKFLOWS = sorted((S.ROOT / "workflows").glob("*.json"))
EDIT_ONE = "FireRed - Edit one picture"
SINGLE_FILES = "FireRed - Edit one picture (single files)"
EXACT = "FireRed - Edit at the exact input size"
SWEEP = "FireRed - Four variations (seed sweep)"
LORA = "FireRed - Edit with a LoRA and speed settings"
REQUIRED = {EDIT_ONE, SINGLE_FILES, EXACT, SWEEP, LORA, "FireRed - Combine three pictures", "FireRed - Text to image",
            "FireRed - Edit inside a mask", "FireRed - Combine more than three pictures"}
LOSSLESS_OFF = {"block_cache": False, "quantize": "none", "quantize_text_encoder": "none"}
# Small sizes for speed: these tests are about the graphs, not the default sizes.
FAST = {"FireRedSampler": {"steps": 2}, "FireRedReferenceImages": {"vl_size": 56, "vae_size": 64},
        "FireRedImageSize": {"megapixels": 0.01, "width": 40, "height": 24},
        "FireRedPackPictures": {"megapixels": 0.05}}


@pytest.fixture(scope="module")
def single_files(tiny_model_dir, tmp_path_factory):
    from firered_core.formats.convert import write_comfy_single_files

    return write_comfy_single_files(tiny_model_dir, tmp_path_factory.mktemp("single"))


@pytest.fixture
def graph_env(tiny_model_dir, single_files, tmp_path, monkeypatch, make_image):
    """Model names a workflow asks for resolve to the tiny model (folder or its single files in ComfyUI's formats),
    LoRA names to a LoRA written from it; every LoadImage gets a picture."""
    loras, files = tmp_path / "loras", tmp_path / "files"
    files.mkdir()
    monkeypatch.setenv("FIRERED_LORA_DIRS", str(loras))
    monkeypatch.setenv("FIRERED_SINGLE_FILE_DIRS", str(files))

    def prepare(workflow: dict, size=(48, 32)) -> dict:
        for node in workflow["nodes"]:
            if node["type"] == "FireRedModelLoader":
                link = tmp_path / node["widgets_values"][0]
                if not link.exists():  # linked in from elsewhere, as users do
                    link.symlink_to(tiny_model_dir, target_is_directory=True)
            if node["type"] == "FireRedSingleFileLoader":
                for name, kind in zip(node["widgets_values"][:3], ("transformer", "text_encoder", "vae")):
                    if not (files / name).exists():
                        (files / name).symlink_to(single_files[kind])
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
    assert REQUIRED <= {p.stem for p in WORKFLOWS}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_ui_format_with_model_note(path):
    wf = json.loads(path.read_text())
    assert {"nodes", "links", "last_node_id", "last_link_id"} <= set(wf)
    notes = [n for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    folders = (("models/diffusion_models", "models/text_encoders", "models/vae")
               if any(n["type"] == "FireRedSingleFileLoader" for n in wf["nodes"]) else ("models/firered",))
    assert notes and all(f in notes[0]["widgets_values"][0] for f in folders)
    ids = {n["id"] for n in wf["nodes"]}
    for link_id, src, _slot, dst, _dslot, _type in wf["links"]:
        assert src in ids and dst in ids
    known = S.object_info()
    assert all(n["type"] in known or n["type"] in S.UI_ONLY for n in wf["nodes"])


def _box(node) -> tuple[float, float, float, float]:
    """A node's area on the canvas, its title bar (30 px above ``pos``) included."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - 30, x + w, y + h


def _inside(inner, outer) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_follows_the_template_conventions(path):
    """CONTRIBUTING.md, "Workflow conventions": title, thumbnail, groups, saved view, pictures, speed."""
    wf = json.loads(path.read_text())
    assert path.stem.startswith("FireRed - ") and "_" not in path.stem
    thumb = path.with_suffix(".jpg")
    assert thumb.is_file() and Image.open(thumb).format == "JPEG" and Image.open(thumb).width <= 1024
    groups = [(g["title"], tuple(g["bounding"][:2]) + (g["bounding"][0] + g["bounding"][2],
                                                         g["bounding"][1] + g["bounding"][3])) for g in wf["groups"]]
    for node in wf["nodes"]:
        if node["type"] in ("Note", "MarkdownNote"):
            continue
        homes = [t for t, box in groups if _inside(_box(node), box)]
        assert len(homes) == 1, f"{node['type']} #{node['id']} is in groups {homes}"
    for i, (_, a) in enumerate(groups):
        for _, b in groups[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], "groups overlap"
    # the saved view shows every node and group in a 1600x1000 window, at a readable scale
    ds = wf["extra"]["ds"]
    assert 0.5 <= ds["scale"] <= 1.0
    for box in [_box(n) for n in wf["nodes"]] + [b for _, b in groups]:
        x0, y0 = (box[0] + ds["offset"][0]) * ds["scale"], (box[1] + ds["offset"][1]) * ds["scale"]
        x1, y1 = (box[2] + ds["offset"][0]) * ds["scale"], (box[3] + ds["offset"][1]) * ds["scale"]
        assert 0 <= x0 and 0 <= y0 and x1 <= 1600 and y1 <= 1000, (path.stem, box)
    shipped = {p.name for p in (S.ROOT / "example_inputs").glob("*.png")}
    for node in wf["nodes"]:
        if node["type"] == "LoadImage":
            assert node["widgets_values"][0] in shipped | {"example.png"}, node["widgets_values"][0]
        if node["type"] == "FireRedSpeedSettings":
            spec = S.classes()["FireRedSpeedSettings"].INPUT_TYPES()
            names = [*spec["required"], *spec.get("optional", {})]
            values = dict(zip(names, node["widgets_values"]))
            assert {k: values[k] for k in LOSSLESS_OFF} == LOSSLESS_OFF
            assert values["attention"] != "sage"  # SageAttention is lossy


def test_example_pictures_are_copied_once_and_never_overwrite(tmp_path):
    folders = S.submodule("_folders")
    shipped = sorted(p.name for p in (S.ROOT / "example_inputs").glob("*.png"))
    assert len(shipped) >= 3
    (tmp_path / shipped[0]).write_bytes(b"the user's own picture")
    copied = folders.install_example_inputs(target=tmp_path)
    assert copied == shipped[1:]
    assert (tmp_path / shipped[0]).read_bytes() == b"the user's own picture"
    assert (tmp_path / shipped[1]).read_bytes() == (S.ROOT / "example_inputs" / shipped[1]).read_bytes()
    assert folders.install_example_inputs(target=tmp_path) == [] and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs(path, graph_env):
    wf = json.loads(path.read_text())
    api = fast(graph_env(wf))
    S.execute(api)
    assert S.SaveImage.saved, "no image saved"
    images = S.SaveImage.saved[-1]
    sampler = next(n for n in api.values() if n["class_type"] == "FireRedSampler")
    assert images.shape[0] == sampler["inputs"]["batch_size"]
    if path.stem == EXACT:
        assert images.shape[1:3] == (32, 48)
    if path.stem == SWEEP:
        assert images.shape[0] == 4 and not np.allclose(images[0].numpy(), images[1].numpy())
    if path.stem == LORA:
        assert "12/12 keys matched" in S.PreviewAny.shown[-1]
        note = next(n for n in wf["nodes"] if n["type"] == "Note")["widgets_values"][0]
        assert "models/loras" in note


def test_exact_size_workflow_keeps_odd_input_size(graph_env):
    wf = json.loads((S.ROOT / "workflows" / f"{EXACT}.json").read_text())
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


@pytest.mark.parametrize("name", [EDIT_ONE, SINGLE_FILES])
def test_single_image_workflow_equals_headless_pipeline(graph_env, tiny_model_dir, name):
    from firered_core.model import load_model
    from firered_core.pipeline import EditPipeline

    wf = json.loads((S.ROOT / "workflows" / f"{name}.json").read_text())
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
