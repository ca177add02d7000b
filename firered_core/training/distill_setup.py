"""Setting up a distillation run (:mod:`.distill`): its checks against the run's other settings, the teacher's
negative prompt, the teacher LoRA merged into the base. Apart from :mod:`.distill` because these need the input
builders and the TrainConfig, which imports :mod:`.distill`'s config section."""

from __future__ import annotations

import logging

import torch

from ..conditioning import PromptEmbeds
from .distill import DistillConfig, DistillObjective

log = logging.getLogger(__name__)


def negative_encoder(cfg, model, device):
    """``(sample, inputs) -> PromptEmbeds``: the teacher's negative prompt with the row's references, encoded online
    as the pipeline encodes it, or the extraction's ``empty`` variant when the run reads cached embeddings."""
    from ..conditioning import encode_prompts
    from .buckets import bucket_key
    from .inputs import open_embeddings
    from .rows import row_images, row_references, vl_images

    store = open_embeddings(cfg)

    def encode(sample, inputs) -> PromptEmbeds:
        if store is not None:
            cached = store.load(sample.uid)
            if "embeds.empty" not in cached:
                raise KeyError(f"row {sample.uid} has no cached 'empty' embedding in {store.root}: the teacher's "
                               "negative prompt; extract the 'empty' variant or encode online")
            return PromptEmbeds(cached["embeds.empty"][None].to(device, torch.float32), None)
        inverse = inputs.variant.startswith("inverse")
        images = row_images(sample, bucket_key(sample), cfg.target_area, cfg.reference_area, inverse=inverse)
        refs = row_references(images, cfg.vl_area)
        neg = encode_prompts(model.text_encoder, model.processor, cfg.distill.negative_prompt, vl_images(refs),
                             mode=cfg.prompt_mode, device=device)
        return PromptEmbeds(neg.embeds.float(), neg.mask)

    return encode


def config_problem(cfg) -> str | None:
    """Why a run's other settings (``cfg``: its TrainConfig) cannot go with distillation, or None."""
    if cfg.preference.enabled or cfg.identity.enabled or cfg.nft.enabled:
        return ("distill.enabled trains on the teacher's own paths: switch preference.enabled, identity.enabled and "
                "nft.enabled off")
    if cfg.method != "lora":
        return ("distill.enabled makes a LoRA that carries its sampling schedule (a full fine-tune's export has no "
                "place for it): set method: lora")
    if cfg.alignment.drop_rate > 0 or cfg.alignment.permute_rate > 0:
        return ("distill.enabled: the teacher's negative prompt is encoded with the row's references as stored; set "
                "alignment.drop_rate and alignment.permute_rate to 0")
    if cfg.embeddings and cfg.variants.inverse_rate > 0:
        return ("distill.enabled with cached embeddings: the teacher's negative is the cached 'empty' variant, which "
                "exists for forward edits only; set variants.inverse_rate: 0")
    d = cfg.distill
    if d.teacher_steps % d.steps:
        return (f"distill.teacher_steps ({d.teacher_steps}) must be a multiple of distill.steps ({d.steps}): the "
                "teacher's path must pass through the student's sigmas")
    if d.segments > d.steps:
        return f"distill.segments ({d.segments}) must be at most distill.steps ({d.steps})"
    return None


def build_objective(cfg, model, module: torch.nn.Module, device) -> DistillObjective:
    """The distillation objective of a run (``cfg``: its TrainConfig, checked with :func:`config_problem`)."""
    from .distill import export_schedule
    from .preference import Reference

    # validation edits at distill.steps then sample on the student's sigmas, as the exported LoRA will
    model.lora_schedule = export_schedule(cfg.distill, model.scheduler_config)
    return DistillObjective(cfg.distill, Reference(module, cfg.method), negative_encoder(cfg, model, device),
                            model.scheduler_config, cfg.seed)


def merge_teacher_lora(transformer: torch.nn.Module, cfg: DistillConfig) -> None:
    """Merge ``teacher_lora`` into the base weights for good (before the trained adapter is added), so the teacher
    is base + that LoRA and the distilled LoRA is made for it. The unmerged weights are released."""
    if not cfg.enabled or not cfg.teacher_lora:
        return
    from ..lora import apply_loras
    from ..lora.state import set_lora_state

    report = apply_loras(transformer, [cfg.teacher_lora], mode="merge")
    set_lora_state(transformer, None)  # no removal later: drop the kept originals
    log.info("distill teacher: %s", report.summary())
