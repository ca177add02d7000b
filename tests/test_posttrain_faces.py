"""The identity loss's face models: an ONNX embedder (exported here from a tiny torch one) and pluggable detectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from firered_core.sampling import noised_start, transformer_denoiser
from firered_core.training import identity as identity_module
from firered_core.training.buckets import bucket_key
from firered_core.training.config import ConfigError, load_config
from firered_core.training.faces import (HaarFaceDetector, IdentityError, check_onnx_conversion, detected_faces,
                                         load_detector, load_embedder)
from firered_core.training.synthetic import make_dataset
from firered_core.training.trainer import Trainer

from test_posttrain_units import TinyFaceEmbedder  # noqa: E402

SMALL = dict(target_area=64 * 64, reference_area=64 * 64, vl_area=64 * 64, tracker=None, warmup_steps=0,
             checkpoint_every=0, resume=None)
PLANTED = [(70.0, 40.0, 40.0, 60.0), (32, 32, 80, 80), (-5, 40, 20, 64)]  # empty, off the edge, clipped
CALLS: list[tuple[int, int]] = []


def planted_detector():
    """The test's detector (``test_posttrain_faces:planted_detector``): fixed boxes, calls recorded."""
    def detect(image: Image.Image):
        CALLS.append(image.size)
        return PLANTED
    return detect


class ConvEmbedder(torch.nn.Module):
    """A tiny ArcFace-shaped embedder (conv, BatchNorm, PReLU, pooling, linear) that the ONNX exporter takes."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8),
                                        torch.nn.PReLU(8), torch.nn.AvgPool2d(2), torch.nn.Flatten(),
                                        torch.nn.Linear(8 * 4 * 4, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * 2 - 1)


def export_onnx(module: torch.nn.Module, path, size: int = 16) -> None:
    torch.onnx.export(module, (torch.rand(2, 3, size, size),), str(path), dynamo=False, opset_version=17,
                      input_names=["crops"],
                      output_names=["embedding"], dynamic_axes={"crops": {0: "faces"}})


def test_onnx_embedder_matches_torch_in_value_and_gradient(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx2torch")
    torch.manual_seed(0)
    net = ConvEmbedder().eval()
    with torch.no_grad():
        net.body[1].running_mean.uniform_(-0.5, 0.5)
        net.body[1].running_var.uniform_(0.5, 2.0)
    export_onnx(net, tmp_path / "face.onnx")
    loaded = load_embedder(str(tmp_path / "face.onnx"), input_size=16)
    assert not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    want = net(x)
    session = ort.InferenceSession(str(tmp_path / "face.onnx"), providers=["CPUExecutionProvider"])
    runtime = torch.from_numpy(session.run(None, {"crops": x.detach().numpy()})[0])
    got = loaded(x)
    assert got.shape == want.shape == (3, 16)
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(runtime, want.detach(), atol=1e-5)
    # the identity loss trains through the embedder's input: the converted graph's gradient is torch's
    (grad_onnx,) = torch.autograd.grad(got.square().sum(), x)
    (grad_torch,) = torch.autograd.grad(want.square().sum(), x)
    assert torch.allclose(grad_onnx, grad_torch, atol=1e-5)
    # a conversion that drifts from onnxruntime is refused, naming the file
    other = ConvEmbedder().eval()
    with pytest.raises(IdentityError, match="face.onnx: the torch conversion disagrees with onnxruntime"):
        check_onnx_conversion(other, session, tmp_path / "face.onnx", 16)
    (tmp_path / "bad.onnx").write_bytes(b"not a graph")
    with pytest.raises(IdentityError, match="bad.onnx: cannot convert"):
        load_embedder(str(tmp_path / "bad.onnx"))


def test_planted_detector_boxes_are_the_ones_cropped(tiny_model_dir, tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "d", rows=2, faces=False)
    torch.manual_seed(0)
    torch.jit.script(TinyFaceEmbedder()).save(str(tmp_path / "face.pt"))
    cfg = load_config(None, **SMALL, model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "run"),
                      steps=1, **{"lora.rank": 4, "variants.text_drop": 0.0, "identity.enabled": True,
                                  "identity.embedder": str(tmp_path / "face.pt"), "identity.input_size": 16,
                                  "identity.cutoff": 1.0, "identity.detector": "test_posttrain_faces:planted_detector"})
    trainer = Trainer(cfg)
    cropped = []
    real = identity_module.face_crops
    monkeypatch.setattr(identity_module, "face_crops", lambda tokens, boxes, *a: cropped.append(list(boxes))
                        or real(tokens, boxes, *a))
    CALLS.clear()
    objective = trainer.objective.identity
    sample = trainer.dataset.samples[0]
    inputs = trainer.row_inputs(sample, bucket_key(sample), 10**9, 0)
    noise = torch.randn(inputs.x0.shape, generator=torch.Generator().manual_seed(0))
    s = torch.tensor([0.5])
    xt = noised_start(inputs.x0, noise, s)
    pred = transformer_denoiser(trainer.transformer, inputs.ref, inputs.img_shapes)(xt, s, inputs.cond, "cond")
    for _ in range(2):
        loss, stats = objective.row_loss(sample, inputs, xt, s, pred)
    expected = [(32.0, 32.0, 64.0, 64.0), (0.0, 40.0, 20.0, 64.0)]  # clipped to the 64x64 target, empty one gone
    assert CALLS == [sample.target_size]  # detected once per row, on the stored target
    assert cropped == [expected, expected] * 2  # x0_hat's crops and the target's, per call
    assert stats["identity_distance"] > 0 and loss.requires_grad
    # a row with its own faces keeps them: the detector is not asked
    own = sample.__class__(**{**sample.__dict__, "faces": ((0.0, 0.0, 16.0, 16.0),)})
    cropped.clear()
    objective.row_loss(own, inputs, xt, s, pred)
    assert cropped[0] == [(0.0, 0.0, 16.0, 16.0)] and len(CALLS) == 1
    trainer.train_step()  # cutoff 1: every drawn sigma < 1 gets the term, on the detector's boxes
    assert trainer.stats["identity_distance"] > 0


def test_detector_specs_and_bad_boxes_are_refused():
    assert load_detector("") is None
    with pytest.raises(IdentityError, match="cannot import"):
        load_detector("no_such_module:factory")
    with pytest.raises(IdentityError, match="returned int"):
        load_detector("builtins:int")
    with pytest.raises(IdentityError, match="data.jsonl:3: the face detector returned"):
        detected_faces(lambda image: [[1, 2, 3]], Image.new("RGB", (8, 8)), "data.jsonl:3")
    with pytest.raises(ConfigError, match="identity.detector"):
        load_config(None, **{"identity.detector": "a face finder"})
    with pytest.raises(ConfigError, match="identity.detector_scale"):
        load_config(None, **{"identity.detector_scale": 1.0})


def drawn_face(size: tuple[int, int], centre: tuple[int, int], r: int) -> Image.Image:
    """A flat cartoon face (skin oval, brows, dark eyes, nose, mouth), slightly blurred, on a blue-grey ground."""
    img = Image.new("RGB", size, (90, 110, 140))
    d = ImageDraw.Draw(img)
    cx, cy = centre
    d.ellipse([cx - r, cy - int(1.25 * r), cx + r, cy + int(1.25 * r)], fill=(225, 185, 160))
    ey, ex, ew, eh = cy - int(0.3 * r), int(0.42 * r), int(0.2 * r), int(0.1 * r)
    for side in (-1, 1):
        d.ellipse([cx + side * ex - ew, ey - eh, cx + side * ex + ew, ey + eh], fill=(40, 30, 30))
        d.rectangle([cx + side * ex - ew - 2, ey - 3 * eh - 2, cx + side * ex + ew + 2, ey - 2 * eh], fill=(70, 50, 40))
    d.polygon([(cx, ey + eh), (cx - int(0.12 * r), cy + int(0.25 * r)), (cx + int(0.12 * r), cy + int(0.25 * r))],
              fill=(200, 160, 135))
    d.ellipse([cx - int(0.35 * r), cy + int(0.5 * r), cx + int(0.35 * r), cy + int(0.65 * r)], fill=(120, 50, 50))
    return img.filter(ImageFilter.GaussianBlur(1.5))


def test_haar_detector_finds_a_drawn_face_and_nothing_in_blocks():
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2, "CascadeClassifier"):
        with pytest.raises(IdentityError, match="OpenCV 5"):
            load_detector("haar")
        pytest.skip(f"OpenCV {cv2.__version__} has no Haar cascade (OpenCV 4.x ships it)")
    detector = load_detector("haar", min_neighbors=3)
    assert isinstance(detector, HaarFaceDetector)
    for centre, r in (((140, 90), 40), ((60, 70), 30)):
        boxes = detected_faces(detector, drawn_face((224, 176), centre, r), "face")
        assert len(boxes) == 1, boxes
        x0, y0, x1, y1 = boxes[0]
        assert abs((x0 + x1) / 2 - centre[0]) <= 0.2 * r and abs((y0 + y1) / 2 - centre[1]) <= 0.3 * r, boxes
        assert 1.5 * r <= x1 - x0 <= 3.2 * r, boxes
    rng = np.random.default_rng(0)
    blocks = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((224, 176), Image.NEAREST)
    assert detected_faces(detector, blocks, "blocks") == ()
