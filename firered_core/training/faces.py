"""The identity loss's face models, both the user's choice and nothing downloaded.

- The embedder: a ``torch.nn.Module``, a TorchScript file, an ONNX file (converted to torch with ``onnx2torch`` so
  gradients reach its input, then checked against ``onnxruntime`` when that is installed; the ``onnx`` extra), or
  ``package.module:factory``. It gets RGB face crops in 0..1, ``[faces, 3, input_size, input_size]``.
- The detector, for rows without a ``faces`` field: anything with the :class:`FaceDetector` signature (a PIL image ->
  boxes ``[x0, y0, x1, y1]`` in its pixels, most important first), as ``package.module:factory``, or ``haar``:
  OpenCV's frontal-face Haar cascade, the XML shipped inside opencv-python-headless 4.x (OpenCV 5 moved the cascade
  classifier out of the main package).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from PIL import Image

from ..errors import FireRedError
from ..plugins import import_object

ONNX_HINT = "pip install onnx onnx2torch onnxruntime (or the 'onnx' extra)"
ONNX_TOLERANCE = 1e-3  # converted module vs onnxruntime: max |difference| / max |onnxruntime output|

Box = tuple[float, float, float, float]


class IdentityError(FireRedError):
    """A face model cannot be loaded or the identity settings are inconsistent."""


@runtime_checkable
class FaceDetector(Protocol):
    def __call__(self, image: Image.Image) -> Sequence[Sequence[float]]:
        """Face boxes ``[x0, y0, x1, y1]`` in ``image``'s pixels, most important first."""


def from_factory(spec: str, key: str) -> object:
    """``package.module:factory()``; an :class:`IdentityError` naming ``key`` when it cannot be imported."""
    return import_object(spec, key, IdentityError)()


# -- embedders -------------------------------------------------------------------------------------------------------
def load_embedder(spec: str | torch.nn.Module, input_size: int = 112) -> torch.nn.Module:
    """A frozen face embedder from a module, a TorchScript or ONNX file, or ``package.module:factory``."""
    if isinstance(spec, torch.nn.Module):
        module = spec
    elif Path(spec).is_file():
        module = onnx_embedder(Path(spec), input_size) if Path(spec).suffix.lower() == ".onnx" \
            else torchscript_embedder(Path(spec))
    elif ":" in str(spec):
        module = from_factory(str(spec), "identity.embedder")
        if not isinstance(module, torch.nn.Module):
            raise IdentityError(f"identity.embedder {spec!r} returned {type(module).__name__}, not a torch module")
    else:
        raise IdentityError(f"identity.embedder {spec!r} is neither a file nor 'package.module:factory'")
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def torchscript_embedder(path: Path) -> torch.nn.Module:
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise IdentityError(f"identity.embedder {path}: not a TorchScript file ({exc})") from None


def onnx_embedder(path: Path, input_size: int = 112) -> torch.nn.Module:
    """The ONNX graph as a torch module (autograd through it), checked against onnxruntime when installed."""
    try:
        import onnx2torch
    except ImportError:
        raise IdentityError(f"identity.embedder {path} is an ONNX file: the identity loss needs its gradient, so it "
                            f"is converted to torch with onnx2torch, which is not installed: {ONNX_HINT}") from None
    try:
        module = onnx2torch.convert(str(path))
    except Exception as exc:  # noqa: BLE001 - a malformed file or an operator onnx2torch lacks
        raise IdentityError(f"identity.embedder {path}: cannot convert this ONNX file to torch ({exc}); "
                            "onnx2torch knows opsets up to 17: re-export with opset_version=17") from None
    try:
        import onnxruntime
    except ImportError:
        return module
    check_onnx_conversion(module, onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]),
                          path, input_size)
    return module


def check_onnx_conversion(module: torch.nn.Module, session, path: Path, input_size: int) -> float:
    """Run one random crop batch through both; raise if the converted module disagrees with onnxruntime."""
    inp = session.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else (2 if k == 0 else 3 if k == 1 else input_size)
             for k, d in enumerate(inp.shape)]
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    want = session.run(None, {inp.name: x.numpy()})[0]
    with torch.no_grad():
        got = module(x)
    got = (got[0] if isinstance(got, (tuple, list)) else got).numpy()
    scale = float(np.abs(want).max()) or 1.0
    error = float(np.abs(got - want).max()) / scale if got.shape == want.shape else float("inf")
    if not error <= ONNX_TOLERANCE:
        raise IdentityError(f"identity.embedder {path}: the torch conversion disagrees with onnxruntime "
                            f"(relative error {error:.2e} > {ONNX_TOLERANCE}, shapes {got.shape} vs {want.shape})")
    return error


# -- detectors -------------------------------------------------------------------------------------------------------
class HaarFaceDetector:
    """OpenCV's ``haarcascade_frontalface_default.xml`` (shipped inside opencv-python-headless 4.x); largest first."""

    def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 5, min_size: int = 24):
        try:
            import cv2
        except ImportError:
            raise IdentityError("identity.detector 'haar' needs OpenCV: pip install 'opencv-python-headless<5'") \
                from None
        xml = Path(getattr(getattr(cv2, "data", None), "haarcascades", "")) / "haarcascade_frontalface_default.xml"
        if not hasattr(cv2, "CascadeClassifier") or not xml.is_file():
            raise IdentityError(f"identity.detector 'haar': OpenCV {cv2.__version__} has no Haar cascade (OpenCV 5 "
                                "moved it out of the main package): pip install 'opencv-python-headless>=4.8,<5', "
                                "or set identity.detector to a 'package.module:factory' detector")
        self.cv2 = cv2
        self.cascade = cv2.CascadeClassifier(str(xml))
        self.scale_factor, self.min_neighbors, self.min_size = scale_factor, min_neighbors, min_size

    def __call__(self, image: Image.Image) -> list[Box]:
        gray = self.cv2.cvtColor(np.asarray(image.convert("RGB")), self.cv2.COLOR_RGB2GRAY)
        found = self.cascade.detectMultiScale(gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
                                              minSize=(self.min_size, self.min_size))
        boxes = [(float(x), float(y), float(x + w), float(y + h)) for x, y, w, h in np.reshape(found, (-1, 4))]
        return sorted(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)


def load_detector(spec: str, scale_factor: float = 1.1, min_neighbors: int = 5, min_size: int = 24
                  ) -> FaceDetector | None:
    """``""`` (none: rows without ``faces`` get no identity term), ``haar``, or ``package.module:factory``."""
    if not spec:
        return None
    if spec == "haar":
        return HaarFaceDetector(scale_factor, min_neighbors, min_size)
    if ":" not in spec:
        raise IdentityError(f"identity.detector {spec!r} is neither 'haar' nor 'package.module:factory'")
    detector = from_factory(spec, "identity.detector")
    if not isinstance(detector, FaceDetector):
        raise IdentityError(f"identity.detector {spec!r} returned {type(detector).__name__}, which is not callable "
                            "as detector(image) -> [[x0, y0, x1, y1], ...]")
    return detector


def detected_faces(detector: FaceDetector, image: Image.Image, where: str) -> tuple[Box, ...]:
    """The detector's boxes for ``image``, clipped to it, empty ones dropped (``where`` names the row in errors)."""
    w, h = image.size
    boxes = []
    for box in detector(image):
        vals = [float(v) for v in box]
        if len(vals) != 4:
            raise IdentityError(f"{where}: the face detector returned {list(box)!r}, not [x0, y0, x1, y1]")
        x0, y0, x1, y1 = vals
        x0, x1 = min(max(x0, 0.0), w), min(max(x1, 0.0), w)
        y0, y1 = min(max(y0, 0.0), h), min(max(y1, 0.0), h)
        if x0 < x1 and y0 < y1:
            boxes.append((x0, y0, x1, y1))
    return tuple(boxes)
