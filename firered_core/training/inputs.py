"""A training row -> model inputs, with the inference stages (one piece of code per idea).

Two builders behind one interface (:meth:`RowInputBuilder.row_inputs`): :class:`OnlineInputs` encodes the instruction
(:func:`firered_core.conditioning.encode_prompts`, in the run's prompt mode, after random alignment) and the images
(:func:`firered_core.references.prepare_references` / ``encode_references`` at the bucket's sizes) at every step;
:class:`CachedInputs` reads what offline extraction stored (:class:`~firered_core.training.extract.EmbeddingStore`) and
VAE-encodes only latents it did not cache. Extraction calls the same functions, so cached and online runs see
identical tensors. Every random choice is a function of ``(seed, step, row position)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import latents as L
from ..conditioning import PromptEmbeds, encode_prompts
from ..references import RefLatents
from .alignment import align, choose_variant, needed_variants, variant_text
from .buckets import BucketKey
from .config import ConfigError, TrainConfig
from .data import DataError
from .extract import EmbeddingStore
from .rows import RowImages, row_images, row_latents, row_references, vl_images
from .seeding import row_rng


@dataclass
class RowInputs:
    x0: torch.Tensor  # [1, L, 64]
    ref: RefLatents
    cond: PromptEmbeds
    img_shapes: list
    variant: str


class RowInputBuilder:
    """``row_inputs(sample, bucket, step, position)``: the variant drawn, the images at the bucket's sizes, then the
    instruction embedding and latents from :meth:`encode` (online or cached)."""

    def __init__(self, cfg: TrainConfig, model, device: torch.device):
        self.cfg, self.model, self.device = cfg, model, device

    def row_inputs(self, sample, key: BucketKey, step: int, pos: int) -> RowInputs:
        cfg = self.cfg
        variant = choose_variant(sample.has_inverse, row_rng(cfg.seed, step, pos, "variant"), cfg.variants)
        inverse = variant.startswith("inverse")
        text = variant_text(sample, variant)
        order, text = self.arrange(sample, text, inverse, step, pos)
        images = row_images(sample, key, cfg.target_area, cfg.reference_area, inverse=inverse, order=order)
        cond, x0, ref = self.encode(sample, variant, text, images, inverse)
        tw, th = images.target_size
        return RowInputs(x0, ref, cond, [[L.token_grid(th, tw), *ref.shapes]], variant)

    def arrange(self, sample, text: str, inverse: bool, step: int, pos: int) -> tuple[list[int] | None, str]:
        """The reference order and the instruction to match (no change here)."""
        return None, text

    def encode(self, sample, variant: str, text: str, images: RowImages,
               inverse: bool) -> tuple[PromptEmbeds, torch.Tensor, RefLatents]:
        raise NotImplementedError


class OnlineInputs(RowInputBuilder):
    """Everything encoded at each step, after random instruction alignment (re-ordered or dropped references)."""

    def arrange(self, sample, text: str, inverse: bool, step: int, pos: int) -> tuple[list[int] | None, str]:
        if inverse or len(sample.sources) <= 1:
            return None, text
        order, (text,) = align(len(sample.sources), [text], row_rng(self.cfg.seed, step, pos, "alignment"),
                               self.cfg.alignment)
        return order, text

    def encode(self, sample, variant, text, images, inverse):
        refs = row_references(images, self.cfg.vl_area)
        cond = encode_prompts(self.model.text_encoder, self.model.processor, text, vl_images(refs),
                              mode=self.cfg.prompt_mode, device=self.device)
        x0, ref = row_latents(self.model.vae, images, refs, self.device)
        return PromptEmbeds(cond.embeds.float(), cond.mask), x0, ref


class CachedInputs(RowInputBuilder):
    """Instruction embeddings (and latents, when extracted with them) read from an extraction; no alignment."""

    def __init__(self, cfg: TrainConfig, model, device: torch.device, store: EmbeddingStore):
        super().__init__(cfg, model, device)
        self.store = store

    def encode(self, sample, variant, text, images, inverse):
        cached = self.store.load(sample.uid)
        if f"embeds.{variant}" not in cached:
            raise DataError(f"row {sample.uid} has no cached '{variant}' embedding in {self.store.root}: "
                           f"extract that variant or set its rate to 0")
        cond = PromptEmbeds(cached[f"embeds.{variant}"][None].to(self.device, torch.float32), None)
        prefix = "latents.inverse_" if inverse else "latents."
        if prefix + "target" not in cached:
            x0, ref = row_latents(self.model.vae, images, row_references(images, self.cfg.vl_area), self.device)
            return cond, x0, ref
        tokens = cached.get(prefix + "refs")
        ref = RefLatents(None if tokens is None else tokens.to(self.device),
                         [L.token_grid(h, w) for w, h in images.source_sizes])
        return cond, cached[prefix + "target"].to(self.device), ref


def open_embeddings(cfg: TrainConfig, samples: list | None = None) -> EmbeddingStore | None:
    """The run's extraction (None for online encoding); refused with random alignment, which needs online text.

    Before step 1, the manifest is compared with what the run will ask for: every row of ``samples`` and every
    instruction variant the variant rates can draw (a run that would stop at its first missing key is refused in
    one line saying what to extract)."""
    if not cfg.embeddings:
        return None
    if cfg.alignment.drop_rate > 0 or cfg.alignment.permute_rate > 0:
        raise ConfigError("random instruction alignment rewrites the instruction, so it needs online encoding: "
                         "unset `embeddings` or set alignment rates to 0")
    store = EmbeddingStore(cfg.embeddings, cfg.prompt_mode)
    if samples is not None:
        have = set(store.manifest.get("variants", []))
        need = needed_variants(cfg.variants, any(s.has_inverse for s in samples))
        if need - have:
            rates = "variants.text_drop, variants.cn_rate and variants.inverse_rate"
            raise DataError(f"embeddings in {store.root} hold the variants {sorted(have)} but this run's {rates} "
                            f"also draw {sorted(need - have)}: extract them (training/extract_embeddings.py "
                            f"--variants {' '.join(sorted(need | have))}) or set those rates so they are never drawn")
        rows = store.manifest.get("rows", {})
        missing = [s.uid for s in samples if s.uid not in rows]
        if missing:
            raise DataError(f"{len(missing)} training row(s) are not in the embeddings at {store.root} (first: "
                            f"{missing[0]}): extract the embeddings of this data (training/extract_embeddings.py)")
    return store


def input_builder(cfg: TrainConfig, model, device: torch.device,
                  store: EmbeddingStore | None) -> RowInputBuilder:
    return OnlineInputs(cfg, model, device) if store is None else CachedInputs(cfg, model, device, store)
