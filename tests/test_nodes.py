"""The node contract, without ComfyUI: well-formed INPUT_TYPES, outputs matching RETURN_TYPES, clear errors, and
the sampler's progress / preview / interruption hooks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import nodes_support as S  # noqa: E402

KNOWN_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "IMAGE", "MASK", "LATENT",
               "FIRERED_MODEL", "FIRERED_REFS", "FIRERED_COND", "FIRERED_CROP", "FIRERED_SPEED"}
NATIVE_TYPES = {"VAE"}  # ComfyUI's own objects a FireRed input also takes (a union type such as FIRERED_MODEL,VAE)


@pytest.fixture(scope="session")
def lora_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA folder with two good LoRAs and one with a renamed key, written from the tiny model."""
    folder = tmp_path_factory.mktemp("loras")
    S.write_lora(tiny_model_dir, folder / "a.safetensors", seed=1)
    S.write_lora(tiny_model_dir, folder / "sub" / "b.safetensors", seed=2, style="kohya")
    S.write_lora(tiny_model_dir, folder / "renamed.safetensors", seed=3, rename=True)
    return folder


@pytest.fixture(scope="session")
def single_file_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model as the single files in ComfyUI's formats (what FireRed Single-File Loader lists)."""
    from firered_core.formats.convert import write_comfy_single_files

    folder = tmp_path_factory.mktemp("single-files")
    write_comfy_single_files(tiny_model_dir, folder)
    return folder


@pytest.fixture
def model_dirs(tiny_model_dir, lora_dir, single_file_dir, monkeypatch):
    monkeypatch.setenv("FIRERED_MODEL_DIRS", str(tiny_model_dir.parent))
    monkeypatch.setenv("FIRERED_LORA_DIRS", str(lora_dir))
    monkeypatch.setenv("FIRERED_SINGLE_FILE_DIRS", str(single_file_dir))
    return tiny_model_dir


@pytest.fixture
def model(model_dirs):
    loader = S.classes()["FireRedModelLoader"]
    return loader().load(model_dirs.name, "fp32", "cpu", "none")[0]


def image(width: int, height: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, height, width, 3, generator=g) * 255).round() / 255


def test_pack_imports_as_comfyui_loads_it():
    pack = S.load_pack()
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    assert len(pack.NODE_CLASS_MAPPINGS) >= 9 and pack.WEB_DIRECTORY is None
    # in a fresh interpreter: other tests of the same worker may have imported anything by now
    probe = ("import sys, nodes_support as S; S.load_pack(); "
             "print(sorted(m for m in ('comfy', 'folder_paths') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(__file__))
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:] + out.stdout


@pytest.mark.parametrize("name", sorted(S.load_pack().NODE_CLASS_MAPPINGS))
def test_input_types_well_formed(name, model_dirs):
    cls = S.load_pack().NODE_CLASS_MAPPINGS[name]
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"} and spec.get("required")
    for section, inputs in spec.items():
        for input_name, s in inputs.items():
            assert isinstance(s, tuple) and 1 <= len(s) <= 2, (name, input_name)
            options = s[1] if len(s) > 1 else {}
            assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"
            if isinstance(s[0], list):
                assert s[0], f"{name}.{input_name}: empty combo"
                assert options.get("default", s[0][0]) in s[0]
                continue
            assert set(s[0].split(",")) <= KNOWN_TYPES | NATIVE_TYPES, (name, input_name, s[0])
            if s[0] in ("INT", "FLOAT"):
                assert options["min"] <= options["default"] <= options["max"], (name, input_name)
                assert isinstance(options["default"], int if s[0] == "INT" else float)
    assert cls.CATEGORY.startswith("FireRed") and cls.DESCRIPTION and callable(getattr(cls, cls.FUNCTION))
    assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
    assert all(t in KNOWN_TYPES for t in cls.RETURN_TYPES)
    assert S.load_pack().NODE_DISPLAY_NAME_MAPPINGS[name].startswith("FireRed ")


def test_custom_types_have_producers_and_consumers():
    produced, consumed = set(), set()
    for cls in S.load_pack().NODE_CLASS_MAPPINGS.values():
        produced |= set(cls.RETURN_TYPES)
        consumed |= {t for inputs in cls.INPUT_TYPES().values() for s in inputs.values() if isinstance(s[0], str)
                     for t in s[0].split(",")}
    custom = {t for t in KNOWN_TYPES if t.startswith("FIRERED_")}
    assert custom <= produced and custom <= consumed


def test_seed_has_control_after_generate():
    seed = S.classes()["FireRedSampler"].INPUT_TYPES()["required"]["seed"]
    assert seed[0] == "INT" and seed[1]["control_after_generate"] is True


def test_loader_shares_weights_and_names_missing_folder(model_dirs):
    loader = S.classes()["FireRedModelLoader"]
    assert model_dirs.name in loader.INPUT_TYPES()["required"]["model_name"][0]
    a = loader().load(model_dirs.name, "auto", "cpu", "none")[0]
    b = loader().load(model_dirs.name, "fp32", "cpu", "none")[0]
    assert a is b and a.dtype == torch.float32
    assert a.transformer is b.transformer
    with pytest.raises(S.submodule("_errors").NodeInputError, match="'model_name'.*not found"):
        loader().load("no-such-model", "auto", "cpu", "none")


def _edit(model, img, prompt="make it blue", **sampler):
    C = S.classes()
    refs = C["FireRedReferenceImages"]().prepare(model, 56, "area", 64, image1=img)[0]
    pos = C["FireRedEncodeInstruction"]().encode(model, prompt, "pipeline", refs)[0]
    neg = C["FireRedEncodeInstruction"]().encode(model, " ", "pipeline", refs)[0]
    latent = C["FireRedImageSize"]().size("width x height", 1.0, 32, 32)[0]
    args = dict(seed=3, steps=2, true_cfg=4.0, shift=0.0, denoise=1.0, batch_size=1, seed_mode="batch")
    args.update(sampler)
    return C["FireRedSampler"]().sample(model, pos, latent, negative=neg, **args)[0]


def test_sampler_progress_preview_and_interrupt(model, monkeypatch):
    progress = S.submodule("_progress")
    bars = []
    monkeypatch.setattr(progress, "progress_bar",
                        lambda total: bars.append(progress.PlainProgressBar(total)) or bars[-1])
    out = _edit(model, image(48, 32), steps=3)
    S.check_value("LATENT", out)
    assert [u[:2] for u in bars[-1].updates] == [(1, 3), (2, 3), (3, 3)]
    assert all(u[2][0] == "JPEG" and u[2][1].size == (4, 4) for u in bars[-1].updates)

    class Interrupting(progress.PlainProgressBar):
        def update_absolute(self, value, total=None, preview=None):
            super().update_absolute(value, total, preview)
            progress.interrupt()

    monkeypatch.setattr(progress, "progress_bar", lambda total: bars.append(Interrupting(total)) or bars[-1])
    with pytest.raises(progress.Interrupted):
        _edit(model, image(48, 32), steps=3)
    assert len(bars[-1].updates) == 1


def test_seed_increment_reproduces_each_image_alone(model):
    batch = _edit(model, image(48, 32), batch_size=2, seed_mode="increment")["samples"]
    second = _edit(model, image(48, 32), seed=4)["samples"]
    assert batch.shape[0] == 2
    torch.testing.assert_close(batch[1:], second, rtol=1e-4, atol=1e-4)


def test_native_latent_seeds_sampler_and_decodes(model):
    C = S.classes()
    padded, crop = C["FireRedPadImage"]().pad(image(30, 20))
    latent = C["FireRedVAEEncode"]().encode(model, padded)[0]
    native = {"samples": latent["samples"][:, :, 0]}
    out = _edit(model, image(48, 32), denoise=0.5)
    S.check_value("LATENT", out)
    C2 = C["FireRedSampler"]().sample
    refs = C["FireRedReferenceImages"]().prepare(model, 56, "area", 64, image1=image(48, 32))[0]
    pos = C["FireRedEncodeInstruction"]().encode(model, "x", "pipeline", refs)[0]
    result = C2(model, pos, native, 0, 2, 1.0, 0.0, 0.5, 1, "batch")[0]["samples"]
    assert result.shape == (1, 16, 1, 4, 4)
    other = C2(model, pos, {"samples": native["samples"] * -1.0}, 0, 2, 1.0, 0.0, 0.5, 1, "batch")[0]["samples"]
    assert float((result - other).abs().max()) > 1e-2  # the input latent's content is the starting point
    from firered_core import comfy_latents as CL
    from firered_core.pipeline import denoise_latents

    init = CL.from_raw(native["samples"], model.vae.config)
    tokens, _ = denoise_latents(model, None, pos.embeds, None, pos.refs.latents, 32, 32, 0, 2, 1.0, denoise=0.5,
                                init=init)
    torch.testing.assert_close(result, CL.to_raw(tokens, 32, 32, model.vae.config).float(), rtol=1e-5, atol=1e-5)
    decoded = C["FireRedDecode"]().decode(model, native)[0]
    assert decoded.shape == (1, 32, 32, 3)
    assert C["FireRedCropBack"]().crop(decoded, crop)[0].shape == (1, 20, 30, 3)


def test_identity_path_keeps_size_and_every_pixel(model):
    """compose (reference + output size) -> pad -> encode -> decode -> crop returns the input's exact size, and
    the geometry alone (pad -> crop) returns every pixel where it was."""
    C = S.classes()
    img = image(75, 41, seed=5)
    latent, crop, w, h = C["FireRedImageSize"]().size("match input", 1.0, 1024, 1024, image=img)
    assert (w, h) == (75, 41) and latent["samples"].shape[-2:] == (48 // 8, 80 // 8)
    padded, pad_crop = C["FireRedPadImage"]().pad(img)
    assert pad_crop == crop and padded.shape == (1, 48, 80, 3)
    assert torch.equal(padded[:, crop.top:crop.top + 41, crop.left:crop.left + 75], img)
    assert torch.equal(C["FireRedCropBack"]().crop(padded, crop)[0], img)
    refs = C["FireRedReferenceImages"]().prepare(model, 56, "match input", 64, image1=img)[0]
    assert refs.images.vae_sizes == [(80, 48)] and refs.latents.shapes == [(1, 3, 5)]
    encoded = C["FireRedVAEEncode"]().encode(model, padded)[0]
    decoded = C["FireRedDecode"]().decode(model, encoded)[0]
    assert decoded.shape == padded.shape
    assert C["FireRedCropBack"]().crop(decoded, crop)[0].shape == img.shape


def test_errors_name_the_input(model):
    C, E = S.classes(), S.submodule("_errors").NodeInputError
    four = torch.cat([image(32, 32)] * 2)
    with pytest.raises(E, match="'image2'.*at most 3"):
        C["FireRedReferenceImages"]().prepare(model, 56, "area", 64, image1=four, image2=four)
    with pytest.raises(E, match="'image1'.*at least one"):
        C["FireRedReferenceImages"]().prepare(model, 56, "area", 64)
    with pytest.raises(E, match="'latent'.*channels"):
        C["FireRedDecode"]().decode(model, {"samples": torch.zeros(1, 4, 8, 8)})
    with pytest.raises(E, match="'image'.*multiple of 16"):
        C["FireRedVAEEncode"]().encode(model, image(30, 20))
    with pytest.raises(E, match="'image'.*match input"):
        C["FireRedImageSize"]().size("match input", 1.0, 64, 64)
    pos = C["FireRedEncodeInstruction"]().encode(model, "a cat", "pipeline")[0]
    odd = {"samples": torch.zeros(1, 16, 1, 5, 4)}
    with pytest.raises(E, match="'latent'.*multiple of 16"):
        C["FireRedSampler"]().sample(model, pos, odd, 0, 2, 1.0, 0.0, 1.0, 1, "batch")
    ok = {"samples": torch.zeros(1, 16, 1, 4, 4)}
    with pytest.raises(E, match="'negative'"):
        C["FireRedSampler"]().sample(model, pos, ok, 0, 2, 4.0, 0.0, 1.0, 1, "batch")


def test_stitch_keeps_every_picture_uncropped():
    stitch = S.classes()["FireRedStitchImages"]()
    a, b = image(40, 20, seed=1), image(16, 32, seed=2)
    row = stitch.stitch(a, "row", 32, 4, image2=b)[0]
    assert row.shape == (1, 32, 64 + 4 + 16, 3)
    torch.testing.assert_close(row[0, :, 68:], b[0])
    column = stitch.stitch(torch.cat([a, a]), "column", 40, 0)[0]
    assert column.shape == (1, 40, 40, 3) and torch.equal(column[0, :20], a[0])
    grid = stitch.stitch(a, "grid", 32, 0, image2=b, image3=a)[0]
    assert grid.shape == (1, 64, 64, 3) and float(grid[0, 0, 0, 0]) == 1.0
