"""Identity-consistency loss (FireRed's SFT constraint for faces).

On the one-step estimate ``x0_hat = x_t - sigma * v`` (flow matching), only the face regions are decoded, both for
``x0_hat`` (with gradients) and for the target latents (without), and compared by a face-embedding model's cosine
distance. The weight ``lambda(sigma) = eta * sigma^2`` below ``cutoff`` (0.9) and 0 above it: the estimate is
meaningless at almost pure noise, and the constraint relaxes towards low noise, where fine detail forms.

Face boxes are ``[x0, y0, x1, y1]`` pixels of the target image as stored (the JSONL ``faces`` field, else the
configured detector's, found once per row); they are scaled to the training size and widened to whole latent pixels.
The embedder and the detector are the user's (:mod:`.faces`); nothing is downloaded. The embedder is frozen;
gradients flow through its input only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field, with_config

from .. import latents as L
from ..limits import CONFIG, NonNegative, PositiveInt
from .faces import IdentityError, detected_faces, load_detector, load_embedder

__all__ = ["IdentityConfig", "IdentityError", "IdentityObjective", "identity_loss", "load_embedder"]


@with_config(CONFIG)
@dataclass
class IdentityConfig:
    enabled: bool = False
    eta: NonNegative = 0.1
    cutoff: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9  # no identity loss at sigma >= cutoff
    embedder: str = ""  # TorchScript or ONNX file, or "package.module:factory"
    input_size: Annotated[int, Field(ge=8, le=1024)] = 112  # face crops are resized to this square before embedding
    max_faces: PositiveInt = 4  # per row, the first ones in the JSONL
    # rows without `faces`: "" (no identity term), "haar" (OpenCV 4's cascade) or "package.module:factory"
    detector: Annotated[str, Field(pattern=r"^(|haar|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$")] = ""
    detector_scale: Annotated[float, Field(gt=1.0, le=2.0)] = 1.1  # haar: image pyramid step
    detector_neighbors: Annotated[int, Field(ge=0, le=50)] = 5  # haar: overlapping hits a face needs
    detector_min_size: Annotated[int, Field(ge=8, le=4096)] = 24  # haar: smallest face side, stored-image pixels


def identity_weight(sigma: torch.Tensor, eta: float, cutoff: float = 0.9) -> torch.Tensor:
    """``eta * sigma^2`` where ``sigma < cutoff``, else 0."""
    return torch.where(sigma < cutoff, eta * sigma.square(), torch.zeros_like(sigma))


def x0_estimate(xt: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One-step clean estimate from the velocity: ``x_t - sigma * v`` (sigma per row)."""
    return xt - sigma.view(-1, *([1] * (xt.dim() - 1))).to(xt.dtype) * v


def latent_box(box, stored_size: tuple[int, int], train_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A pixel box of the stored image -> (top, bottom, left, right) latent pixels at the training size."""
    sw, sh = stored_size
    tw, th = train_size
    x0, y0, x1, y1 = box
    s = L.VAE_SCALE
    left, right = math.floor(x0 * tw / sw / s), math.ceil(x1 * tw / sw / s)
    top, bottom = math.floor(y0 * th / sh / s), math.ceil(y1 * th / sh / s)
    left, top = max(0, min(left, tw // s - 1)), max(0, min(top, th // s - 1))
    bottom, right = min(bottom, th // s), min(right, tw // s)
    return top, max(bottom, top + 1), left, max(right, left + 1)


def face_crops(tokens: torch.Tensor, boxes, stored_size, train_size, vae, size: int) -> torch.Tensor:
    """Decode only the face regions of packed latents -> [faces, 3, size, size] in 0..1."""
    tw, th = train_size
    z = L.denormalize(L.unpack(tokens, th, tw), vae.config)
    crops = []
    for box in boxes:
        top, bottom, left, right = latent_box(box, stored_size, train_size)
        pixels = vae.decode(z[..., top:bottom, left:right], return_dict=False)[0][:, :, 0] * 0.5 + 0.5
        crops.append(F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False))
    return torch.cat(crops)


def identity_distance(embedder, crops: torch.Tensor, target_crops: torch.Tensor) -> torch.Tensor:
    """Per-face cosine distance ``1 - cos`` between the embeddings of two crop batches."""
    with torch.no_grad():
        ref = embedder(target_crops)
    return 1.0 - F.cosine_similarity(embedder(crops).flatten(1), ref.flatten(1), dim=1)


def identity_loss(xt: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor, x0: torch.Tensor, boxes,
                  stored_size, train_size, vae, embedder, cfg: IdentityConfig) -> tuple[torch.Tensor, dict]:
    """``lambda(sigma) * mean face distance`` for one row; nothing is decoded when the weight or the boxes are 0."""
    weight = identity_weight(sigma.float(), cfg.eta, cfg.cutoff).reshape(())
    boxes = list(boxes)[: cfg.max_faces]
    if not boxes or float(weight) == 0.0:
        return v.sum() * 0.0, {"identity_distance": float("nan")}
    vae_dtype = next(vae.parameters()).dtype
    x0_hat = x0_estimate(xt, sigma, v)
    crops = face_crops(x0_hat.to(vae_dtype), boxes, stored_size, train_size, vae, cfg.input_size)
    with torch.no_grad():
        target = face_crops(x0.to(vae_dtype), boxes, stored_size, train_size, vae, cfg.input_size)
    distance = identity_distance(embedder, crops, target).mean()
    return weight * distance, {"identity_distance": float(distance.detach())}


def train_size(img_shapes: list) -> tuple[int, int]:
    """(width, height) in pixels of the output image from a row's ``img_shapes``."""
    _, rows, cols = img_shapes[0][0]
    return cols * 2 * L.VAE_SCALE, rows * 2 * L.VAE_SCALE


class IdentityObjective:
    """The identity term of a row with face boxes, on the prediction the flow-matching loss already made."""

    def __init__(self, cfg: IdentityConfig, vae, embedder: torch.nn.Module | None = None):
        if embedder is None and not cfg.embedder:
            raise IdentityError("identity.enabled needs identity.embedder: a TorchScript or ONNX file or "
                                "'module:factory'")
        self.cfg, self.vae = cfg, vae
        self.embedder = load_embedder(embedder if embedder is not None else cfg.embedder, cfg.input_size)
        self.detector = load_detector(cfg.detector, cfg.detector_scale, cfg.detector_neighbors, cfg.detector_min_size)
        self.detected: dict[str, tuple] = {}  # row uid -> boxes found on its stored target (once per row)

    def to(self, device) -> "IdentityObjective":
        self.embedder.to(device)
        return self

    def row_loss(self, sample, inputs, xt: torch.Tensor, sigma: torch.Tensor, pred: torch.Tensor
                 ) -> tuple[torch.Tensor, dict]:
        if inputs.variant.startswith("inverse"):  # the boxes are the target's; an inverse edit's target is a source
            return pred.sum() * 0.0, {"identity_distance": float("nan")}
        return identity_loss(xt, sigma, pred, inputs.x0, self.faces(sample), sample.target_size,
                             train_size(inputs.img_shapes), self.vae, self.embedder, self.cfg)

    def faces(self, sample) -> tuple:
        """The row's ``faces``, else (with a detector) the boxes found on its stored target image."""
        if sample.faces or self.detector is None:
            return sample.faces
        if sample.uid not in self.detected:
            from ..images import load_image

            self.detected[sample.uid] = detected_faces(self.detector, load_image(sample.target),
                                                       f"{sample.file}:{sample.line}")
        return self.detected[sample.uid]
