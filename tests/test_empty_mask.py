"""An all-zero mask (LoadImage's mask of a picture nobody painted) would run a whole edit and give back the input
without a word: the library, the CLI and the nodes warn. The "Edit inside a mask" template ships a picture whose
alpha holds a painted region, so it shows a real edit on a fresh install."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import nodes_support as S  # noqa: E402

from firered_core import cli  # noqa: E402
from firered_core.masks import mask_from_pil  # noqa: E402

WARNING = "the mask is all zero"
TEMPLATE = S.ROOT / "workflows" / "FireRed - Edit inside a mask.json"


class Stop(BaseException):
    """Ends the edit where the test has seen what it needs (the warning comes before any model work)."""


def stop(*args, **kwargs):
    raise Stop


def test_library_warns_on_an_all_zero_mask_and_not_on_a_painted_one(make_image, caplog, monkeypatch):
    from firered_core.pipeline import EditPipeline

    monkeypatch.setattr(EditPipeline, "encode_prompts", stop)  # the warning comes before the text encoder runs
    img = make_image(32, 32)
    painted = torch.zeros(1, 32, 32)
    painted[:, 8:16, 8:16] = 1
    for mask, warned in ((torch.zeros(1, 32, 32), True), (painted, False), (torch.full((1, 32, 32), 0.2), False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING), pytest.raises(Stop):
            EditPipeline(None).edit([img], "blue", None, mask=mask, steps=1)
        assert (WARNING in caplog.text and "masked edit" in caplog.text) == warned, mask.max()


def test_cli_warns_on_an_unpainted_mask_file_before_loading(make_image, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(cli, "load_from_args", stop)
    make_image(32, 32).save(tmp_path / "in.png")
    Image.new("L", (32, 32), 0).save(tmp_path / "mask.png")
    with caplog.at_level(logging.WARNING), pytest.raises(Stop):
        cli.main(["-p", "blue", "-i", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                  "-o", str(tmp_path / "out.png")])
    assert f"--mask {tmp_path / 'mask.png'}: {WARNING}" in caplog.text


def test_nodes_warn_on_an_all_zero_mask(caplog):
    composite = S.classes()["FireRedMaskedComposite"]()
    image = torch.rand(1, 16, 16, 3)
    with caplog.at_level(logging.WARNING):
        composite.composite(image, image, torch.zeros(1, 16, 16), 0, "off")
    assert "FireRed Masked Composite: input 'mask'" in caplog.text and WARNING in caplog.text


def test_masked_template_ships_a_picture_with_a_painted_mask():
    """As LoadImage reads it (MASK = 1 - alpha), the template's picture marks a region: neither nothing nor all."""
    wf = json.loads(TEMPLATE.read_text())
    name = next(n for n in wf["nodes"] if n["type"] == "LoadImage")["widgets_values"][0]
    path = S.ROOT / "example_inputs" / name
    assert path.is_file(), f"{name} is not shipped in example_inputs/ (install_example_inputs copies those)"
    assert path.stat().st_size < 250_000
    picture = Image.open(path)
    assert picture.mode == "RGBA"
    mask = mask_from_pil(picture)[0].numpy()
    painted = float((mask > 0.5).mean())
    assert 0.05 < painted < 0.6, painted
    assert np.asarray(picture.convert("RGB")).std() > 20  # a photograph, not a flat fill
