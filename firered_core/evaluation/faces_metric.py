"""Face identity, source against output: is the person still the same person after the edit?

The cosine similarity of face embeddings, through the identity-training plug-ins (:mod:`..training.faces`): the
embedder is the user's file (TorchScript or ONNX) or ``package.module:factory``, the detector ``haar`` (OpenCV's
cascade), ``package.module:factory``, or none (the whole picture is the face, for crops). Nothing is downloaded.

The largest face of the source is compared with the largest face of the output. When the detector finds no face in
the output, the source's box (scaled to the output's size) is compared instead, and the record says so: an edit that
destroyed the face then scores low rather than being left out. A source without a face is not measured.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..training.faces import Box, detected_faces, load_detector, load_embedder

PEOPLE_TASKS = ("portrait", "beauty", "face", "person", "people", "human")  # task names that involve people


def _spec_id(spec) -> str:
    """What identifies a plug-in for the cache: a file by its content, a factory or module by its name."""
    if isinstance(spec, torch.nn.Module):
        return f"module:{type(spec).__qualname__}"
    path = Path(str(spec))
    if path.is_file():
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    return str(spec)


def face_crop(image: Image.Image, box: Box, size: int) -> torch.Tensor:
    """[1, 3, size, size] in 0..1: the box cut out of ``image`` and resized."""
    crop = image.convert("RGB").crop(tuple(round(v) for v in box)).resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


class FaceIdentity:
    """``metric(source, output, where)`` -> ``{"face_identity": cosine, "face_box": "detected" | "source box"}``, or
    None when the source shows no face. ``name`` identifies the models and settings (the cache key's part)."""

    def __init__(self, embedder, detector: str = "haar", input_size: int = 112):
        self.embedder = load_embedder(embedder, input_size)
        self.detector = load_detector(detector) if detector and detector != "none" else None
        self.size = input_size
        self.name = f"face:{_spec_id(embedder)}:{detector or 'none'}:{input_size}"

    def boxes(self, image: Image.Image, where: str) -> tuple[Box, ...]:
        if self.detector is None:
            return ((0.0, 0.0, float(image.width), float(image.height)),)
        return detected_faces(self.detector, image, where)

    def embed(self, image: Image.Image, box: Box) -> torch.Tensor:
        """[D] float64: the embedding of ``box`` in ``image``."""
        with torch.no_grad():
            emb = self.embedder(face_crop(image, box, self.size))
        return (emb[0] if isinstance(emb, (tuple, list)) else emb).flatten(1)[0].double()

    def __call__(self, source: Image.Image, output: Image.Image, where: str = "sample") -> dict | None:
        src_boxes = self.boxes(source, f"{where} (source)")
        if not src_boxes:
            return None
        out_boxes = self.boxes(output, f"{where} (output)")
        if out_boxes:
            out_box, how = out_boxes[0], "detected"
        else:
            sx, sy = output.width / source.width, output.height / source.height
            x0, y0, x1, y1 = src_boxes[0]
            out_box, how = (x0 * sx, y0 * sy, x1 * sx, y1 * sy), "source box"
        a, b = self.embed(source, src_boxes[0]), self.embed(output, out_box)
        return {"face_identity": float(F.cosine_similarity(a, b, dim=0)), "face_box": how}
