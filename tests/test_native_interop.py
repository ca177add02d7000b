"""FireRed Decode / VAE Encode with ComfyUI's own VAE and MASK (issue 9, point 5).

Without ComfyUI: a stand-in with the API of ComfyUI's ``comfy.sd.VAE`` (IMAGE-layout encode / decode, 5-D output)
wrapping the tiny model's VAE gives exactly what the FireRed model gives. With ComfyUI (``FIRERED_COMFYUI_DIR`` and
``FIRERED_COMFYUI_PYTHON``, its venv's Python): ComfyUI's real VAE object, built by ComfyUI from a full-size Wan 2.1 VAE
state dict in ComfyUI's key names, matches the FireRed model holding the same weights; inside ComfyUI the pack finds
ComfyUI's own Qwen2.5 tokenizer folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import nodes_support as S  # noqa: E402

COMFY_DIR = os.environ.get("FIRERED_COMFYUI_DIR", "")
COMFY_PY = os.environ.get("FIRERED_COMFYUI_PYTHON", "")


class NativeVAE:
    """ComfyUI's VAE contract: ``encode(IMAGE [B,H,W,3]) -> raw latent [B,16,1,h,w]``, ``decode(latent) ->
    [B,1,H,W,3]`` in 0..1."""

    def __init__(self, vae):
        self.vae = vae

    @torch.no_grad()
    def encode(self, pixels):
        x = (2 * pixels.movedim(-1, 1) - 1).unsqueeze(2)
        return self.vae.encode(x).latent_dist.mode()

    @torch.no_grad()
    def decode(self, samples):
        x = self.vae.decode(samples).sample
        return ((x.clamp(-1, 1) + 1) / 2).movedim(1, -1)


def test_native_vae_object_gives_the_model_results(tiny_model):
    classes = S.classes()
    enc, dec = classes["FireRedVAEEncode"](), classes["FireRedDecode"]()
    native = NativeVAE(tiny_model.get("vae"))
    image = torch.rand(2, 32, 48, 3, generator=torch.Generator().manual_seed(0))
    ours, theirs = enc.encode(tiny_model, image)[0], enc.encode(native, image)[0]
    S.check_value("LATENT", theirs)
    torch.testing.assert_close(theirs["samples"], ours["samples"], atol=1e-5, rtol=1e-5)
    a, b = dec.decode(tiny_model, ours)[0], dec.decode(native, ours)[0]
    S.check_value("IMAGE", b)
    assert b.shape == a.shape == (2, 32, 48, 3)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_mask_becomes_the_latent_noise_mask(tiny_model):
    enc = S.classes()["FireRedVAEEncode"]()
    image = torch.rand(1, 32, 48, 3)
    mask = torch.zeros(32, 48)
    mask[8:24, 16:40] = 1
    out = enc.encode(tiny_model, image, mask)[0]
    assert out["noise_mask"].shape == (1, 1, 32, 48) and torch.equal(out["noise_mask"][0, 0], mask)
    with pytest.raises(S.submodule("_errors").NodeInputError, match="input 'mask'.*16x16 but the image is 48x32"):
        enc.encode(tiny_model, image, torch.zeros(1, 16, 16))


def test_not_a_vae_is_named():
    dec = S.classes()["FireRedDecode"]()
    with pytest.raises(S.submodule("_errors").NodeInputError, match="expected a FireRed model or a VAE, got str"):
        dec.decode("qwen_image_vae.safetensors", {"samples": torch.zeros(1, 16, 1, 4, 4)})


SCRIPT = r'''
import importlib.util, sys, tempfile
comfy_dir, pack = sys.argv[1], sys.argv[2]
sys.argv = [sys.argv[0], "--cpu"]
sys.path[:0] = [comfy_dir, pack]
import comfy.options
comfy.options.enable_args_parsing()
import torch
import folder_paths
folder_paths.set_input_directory(tempfile.mkdtemp())
import comfy.sd
from diffusers import AutoencoderKLQwenImage
from firered_core.formats import convert_diffusers_vae_state
from firered_core.model import FireRedModel
torch.manual_seed(0)
vae = AutoencoderKLQwenImage().eval()  # the full-size Wan 2.1 / Qwen-Image VAE (ComfyUI builds only that one)
native = comfy.sd.VAE(sd={k: v.contiguous() for k, v in convert_diffusers_vae_state(vae.state_dict()).items()})
spec = importlib.util.spec_from_file_location("firered_pack", pack + "/__init__.py", submodule_search_locations=[pack])
mod = importlib.util.module_from_spec(spec); sys.modules["firered_pack"] = mod; spec.loader.exec_module(mod)
assert sys.modules["firered_pack.nodes._comfy"].IN_COMFY
print("tokenizer", sys.modules["firered_pack.nodes._folders"].comfy_tokenizer_dir())
model = FireRedModel()
model.set("vae", vae)
enc, dec = mod.NODE_CLASS_MAPPINGS["FireRedVAEEncode"](), mod.NODE_CLASS_MAPPINGS["FireRedDecode"]()
image = torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(1))
ours, theirs = enc.encode(model, image)[0], enc.encode(native, image)[0]
a, b = dec.decode(model, ours)[0], dec.decode(native, ours)[0]
print("latent", tuple(theirs["samples"].shape), float((theirs["samples"] - ours["samples"]).abs().max()))
print("image", tuple(b.shape), tuple(a.shape), float((a - b).abs().max()))
'''


@pytest.mark.skipif(not (Path(COMFY_DIR, "comfy", "sd.py").is_file() and Path(COMFY_PY).is_file()),
                    reason="needs ComfyUI: FIRERED_COMFYUI_DIR (source) and FIRERED_COMFYUI_PYTHON (its venv's Python)")
def test_comfyui_vae_object_matches_the_firered_model(tmp_path):
    out = subprocess.run([COMFY_PY, "-c", SCRIPT, COMFY_DIR, str(S.ROOT)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines()
                 if line.startswith(("latent", "image", "tokenizer")))
    assert Path(lines["tokenizer"]).resolve() == Path(COMFY_DIR).resolve() / "comfy" / "text_encoders" / "qwen25_tokenizer"
    shape, diff = lines["latent"].rsplit(" ", 1)
    assert shape == "(1, 16, 1, 8, 12)" and float(diff) < 1e-3, lines
    shapes, diff = lines["image"].rsplit(" ", 1)
    assert shapes == "(1, 64, 96, 3) (1, 64, 96, 3)" and float(diff) < 1e-3, lines
