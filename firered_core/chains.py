"""Edit chains: instructions applied one after another, each onto the running result, without drift.

A small loop over :meth:`EditPipeline.edit` (never a second sampler). Each round:

- edits the running result (the last image; earlier images stay references as given);
- with ``preserve="auto"`` pastes only what the round really changed onto the running result
  (:mod:`preserve`), so a pixel outside the union of all rounds' regions is the original's, bit for bit, however
  many rounds run;
- reuses the previous round's latent as the next round's reference latent when the generation size equals the
  reference's VAE size (always so with ``match_input=True``): no VAE encode of the running result, hence no extra
  VAE round trip. Outside the round's region (on the 16-px token grid) that latent keeps the previous reference's
  tokens, so the reference latent drifts no more than the pixels do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from PIL import Image

from . import geometry as G
from . import masks as M
from .errors import InputError


@dataclass
class ChainResult:
    image: Image.Image  # the final result
    rounds: list[Image.Image]  # the running result after each round
    masks: list[torch.Tensor]  # each round's region [H, W] (1 = taken from that round's edit)
    notes: list[str] = field(default_factory=list)
    reused: int = 0  # rounds whose reference latent came from the previous round (no VAE encode)

    @property
    def union(self) -> torch.Tensor:
        """The pixels any round changed (bool [H, W])."""
        return torch.stack(self.masks).amax(0) > 0


def next_reference(result, region: torch.Tensor) -> torch.Tensor | None:
    """The next round's reference tokens: this round's output latent inside ``region`` (any token it touches),
    the previous reference's tokens elsewhere; None when the generation and reference sizes differ."""
    if result.reference_latent is None or result.generation_size != result.reference_size:
        return None
    width, height = result.generation_size
    region = region.float()[None]
    if (region.shape[2], region.shape[1]) != (width, height):
        record = G.pad_record(region.shape[2], region.shape[1])
        if (record.padded_width, record.padded_height) == (width, height):
            region = G.pad_to_multiple(region[..., None])[0][..., 0]
        else:
            region = M.resize_mask(region, width, height)
    tokens = M.token_mask(region) > 0
    new, old = result.latents[:1], result.reference_latent.to(result.latents.device, result.latents.dtype)
    return torch.where(tokens.to(new.device), new, old)


def edit_chain(pipeline, images: Sequence[Image.Image], prompts: Sequence[str], preserve: str = "auto",
               seed: int = 0, on_round=None, **edit_kwargs) -> ChainResult:
    """Apply ``prompts`` in order to the last of ``images``; round ``k`` uses seed ``seed + k``.

    ``edit_kwargs`` go to every :meth:`EditPipeline.edit` call (steps, true_cfg, match_input, feather, ...);
    ``on_round(round, result)`` is called after each round.
    """
    images = list(images)
    if not images:
        raise InputError("an edit chain needs an image to edit", field="image")
    if len(prompts) < 1:
        raise InputError("an edit chain needs at least one instruction", field="prompt")
    for key, bad in (("mask", edit_kwargs.get("mask") is not None), ("num_images", edit_kwargs.get("num_images", 1) != 1)):
        if bad:
            raise InputError(f"an edit chain edits one picture per round without a painted mask; drop {key}",
                             field=key)
    edit_kwargs.pop("num_images", None)
    running, reference = images[-1], None
    rounds, masks, notes, reused = [], [], [], 0
    for k, prompt in enumerate(prompts):
        reused += reference is not None
        result = pipeline.edit(images[:-1] + [running], prompt, seed=seed + k, preserve=preserve,
                               reference_latent=reference, **edit_kwargs)
        running = result.images[0]
        region = (result.masks[0] if result.masks is not None
                  else torch.ones(running.height, running.width))
        rounds.append(running)
        masks.append(region)
        notes += [f"round {k + 1}: {n}" for n in result.notes]
        reference = next_reference(result, region)
        if on_round is not None:
            on_round(k, result)
    return ChainResult(running, rounds, masks, notes, reused)
