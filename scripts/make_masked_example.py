"""Write example_inputs/firered_masked.png: the picture of the "Edit inside a mask" workflow template.

A real photograph (skimage.data.coffee, shipped in scikit-image's wheel) with a painted mask in its alpha, the way
ComfyUI's MaskEditor saves one: painted pixels are transparent (LoadImage's MASK = 1 - alpha), the colours stay.
The painted region is an ellipse over the cup, so the template's prompt ("Make the cup blue.") has something to
edit on a fresh install. Run: python scripts/make_masked_example.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parents[1] / "example_inputs" / "firered_masked.png"
SIZE = (360, 240)
CUP = (0.25, 0.0, 0.72, 0.70)  # the painted ellipse's box, as fractions of width and height


def main() -> None:
    from skimage import data

    picture = Image.fromarray(data.coffee()).resize(SIZE, Image.LANCZOS)
    alpha = Image.new("L", SIZE, 255)
    w, h = SIZE
    ImageDraw.Draw(alpha).ellipse([CUP[0] * w, CUP[1] * h, CUP[2] * w, CUP[3] * h], fill=0)
    rgba = np.dstack([np.asarray(picture), np.asarray(alpha)])
    Image.fromarray(rgba, "RGBA").save(OUT, optimize=True)
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
