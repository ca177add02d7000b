"""Preference training: Diffusion-DPO (Wallace et al. 2023) with positive-sample reinforcement.

Both images of a pair (``target_image`` preferred w, ``rejected_image`` dispreferred l) are noised with the same noise
and sigma. With e = the per-row flow-matching error of the trained model and r = the frozen reference's,

    inside = -beta / 2 * (omega * (e_w - r_w) - (e_l - r_l))
    loss   = -log sigmoid(inside) + sft_weight * e_w

With ``omega = 1`` this is the published loss (the ``-0.5 * beta_dpo`` scaling of the authors' diffusers script);
``omega > 1`` weighs the preferred sample's term more (FireRed's positive-sample reinforcement) and leaves the
dispreferred term untouched. The logged implicit reward margin is the unweighted ``-beta / 2 * ((e_w - r_w) -
(e_l - r_l))`` and the accuracy the fraction of rows where it is positive.

The reference is the LoRA-disabled base when a LoRA is trained (the same weights, no second copy) or a frozen copy
of the transformer for full fine-tuning. Under FSDP the LoRA-disabled pass runs through the FSDP-wrapped model (which
gathers the sharded weights; the unwrapped module only holds this rank's flat shards), and the frozen copy is
sharded by FSDP as the trained model is.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field, with_config

from ..limits import CONFIG, NonNegative, Positive

log = logging.getLogger(__name__)


@with_config(CONFIG)
@dataclass
class PreferenceConfig:
    enabled: bool = False
    beta: Positive = 2500.0  # the Diffusion-DPO paper's beta for SD-sized models
    omega: Annotated[float, Field(ge=1.0)] = 1.0  # weight of the preferred term
    sft_weight: NonNegative = 0.0  # flow-matching loss on the preferred sample, added to the DPO loss


@dataclass
class DPOStats:
    margin: torch.Tensor  # per-row implicit reward margin (detached)
    accuracy: float

    def as_dict(self) -> dict[str, float]:
        return {"dpo_margin": float(self.margin.mean()), "dpo_accuracy": self.accuracy}


def dpo_logits(model_w: torch.Tensor, model_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
               beta: float, omega: float = 1.0) -> torch.Tensor:
    """Per-row ``-beta / 2 * (omega * (e_w - r_w) - (e_l - r_l))``: the DPO loss is ``-log sigmoid`` of it."""
    return -0.5 * beta * (omega * (model_w - ref_w.detach()) - (model_l - ref_l.detach()))


def dpo_loss(model_w: torch.Tensor, model_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta: float, omega: float = 1.0, sft_weight: float = 0.0) -> tuple[torch.Tensor, DPOStats]:
    """Mean Diffusion-DPO loss over rows from per-row errors (model and reference, preferred and dispreferred)."""
    loss = -F.logsigmoid(dpo_logits(model_w, model_l, ref_w, ref_l, beta, omega)).mean()
    if sft_weight:
        loss = loss + sft_weight * model_w.mean()
    margin = dpo_logits(model_w, model_l, ref_w, ref_l, beta).detach()
    return loss, DPOStats(margin, float((margin > 0).float().mean()))


@contextlib.contextmanager
def adapters_disabled(module: torch.nn.Module):
    """Run ``module`` as its base: PEFT adapters (LoRA) switched off for the block, back on afterwards."""
    module.disable_adapters()
    try:
        yield module
    finally:
        module.enable_adapters()


class Reference:
    """The frozen reference model's forward: the adapter-less base (LoRA) or a frozen copy (full fine-tuning)."""

    def __init__(self, transformer: torch.nn.Module, method: str):
        self.method = method
        self.base = transformer
        self.copy = None
        if method != "lora":
            self.copy = copy.deepcopy(transformer).requires_grad_(False).eval()

    def after_prepare(self, acc) -> None:
        """Shard the frozen copy as the trained model is (FSDP); nothing to do for a LoRA or without FSDP."""
        from .shards import shard_frozen

        if self.copy is not None:
            self.copy = shard_frozen(acc, self.copy)
            log.info("DPO reference: a frozen copy, %s", type(self.copy).__name__)

    @contextlib.contextmanager
    def model(self, wrapped: torch.nn.Module | None = None):
        """The reference transformer for the block (no gradients). ``wrapped``: the prepared (DDP / FSDP) model
        around ``transformer``, which runs the LoRA-disabled pass (default: ``transformer`` itself)."""
        with torch.no_grad():
            if self.copy is not None:
                yield self.copy
            else:
                with adapters_disabled(self.base):
                    yield self.base if wrapped is None else wrapped


def rejected_latents(vae, sample, train_size: tuple[int, int], device) -> torch.Tensor:
    """The row's dispreferred image at the target's training size, encoded as the target is."""
    from ..images import load_image
    from ..references import encode_pixels, resize_lanczos, vae_pixels

    if sample.rejected is None:
        from .data import DataError

        raise DataError(f"{sample.file}:{sample.line}: preference training needs a rejected_image on every row")
    img = load_image(sample.rejected)
    if img.size != tuple(train_size):
        img = resize_lanczos(img, *train_size)
    return encode_pixels(vae, vae_pixels(img), device).float()


def pair_batch(x0_w: torch.Tensor, x0_l: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, cond):
    """Both images of a pair as one batch of two, with the same noise, sigma and instruction."""
    from ..conditioning import PromptEmbeds
    from ..sampling import noised_start

    x0 = torch.cat([x0_w, x0_l])
    noise2, sigma2 = noise.expand_as(x0), sigma.reshape(-1)[:1].expand(2)
    mask = None if cond.mask is None else cond.mask.expand(2, -1)
    return x0, noise2, sigma2, noised_start(x0, noise2, sigma2), PromptEmbeds(cond.embeds.expand(2, -1, -1), mask)


class PreferenceObjective:
    """One row's DPO loss: the trained model and the reference on the (preferred, dispreferred) batch of two."""

    def __init__(self, cfg: PreferenceConfig, module: torch.nn.Module, method: str, outlier: float | None):
        self.cfg, self.outlier = cfg, outlier
        self.reference = Reference(module, method)

    def row_loss(self, transformer, inputs, x0_l: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor
                 ) -> tuple[torch.Tensor, DPOStats]:
        from ..sampling import transformer_denoiser
        from .losses import row_errors

        x0, noise2, sigma2, xt, cond = pair_batch(inputs.x0, x0_l, noise, sigma, inputs.cond)
        # The no-grad reference pass first: FSDP then sees the trained forward right before its backward.
        with self.reference.model(transformer) as ref:
            ref_pred = transformer_denoiser(ref, inputs.ref, inputs.img_shapes)(xt, sigma2, cond, "cond")
        pred = transformer_denoiser(transformer, inputs.ref, inputs.img_shapes)(xt, sigma2, cond, "cond")
        model_err, _ = row_errors(pred, noise2, x0, self.outlier)
        ref_err, _ = row_errors(ref_pred, noise2, x0, self.outlier)
        return dpo_loss(model_err[:1], model_err[1:], ref_err[:1], ref_err[1:], self.cfg.beta, self.cfg.omega,
                        self.cfg.sft_weight)
