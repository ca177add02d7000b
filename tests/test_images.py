"""One rule for every PIL mode: EXIF orientation, alpha on white, everything else to 8-bit RGB."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from firered_core.images import ImageInputError, load_image, to_rgb


def _save(tmp_path, img, name, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "I;16", "CMYK", "I", "F", "1", "YCbCr"])
def test_every_mode_becomes_rgb(mode, make_image):
    src = make_image(40, 30, seed=1)
    img = src.convert(mode) if mode not in ("I;16", "I", "F") else src.convert("L").convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (40, 30)


def test_alpha_is_composited_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0, 255))
    arr = np.asarray(to_rgb(img))
    assert tuple(arr[0, 0]) == (255, 0, 0)
    assert tuple(arr[1, 1]) == (255, 255, 255)


def test_palette_transparency_goes_to_white():
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 0
    arr = np.asarray(to_rgb(img))
    assert tuple(arr[0, 0]) == (255, 255, 255) and tuple(arr[0, 1]) == (10, 200, 30)


def test_sixteen_bit_grey_uses_full_range():
    img = Image.new("I;16", (2, 1))
    img.putdata([0, 65535])
    out = np.asarray(to_rgb(img))
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [255, 255, 255]


def test_exif_orientation_is_honoured(tmp_path, make_image):
    img = make_image(40, 20, seed=2)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = _save(tmp_path, img, "rot.jpg", exif=exif.tobytes(), quality=95)
    assert load_image(path).size == (20, 40)


def test_unreadable_and_missing_files_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageInputError, match="broken.png"):
        load_image(bad)
    with pytest.raises(ImageInputError, match="nothere.png"):
        load_image(tmp_path / "nothere.png")
    truncated = tmp_path / "cut.png"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
    truncated.write_bytes(buf.getvalue()[:40])
    with pytest.raises(ImageInputError, match="cut.png"):
        load_image(truncated)
