"""The whole edit, stage by stage: references -> conditioning -> sampling -> decode.

Each stage is a function of its own module; :class:`EditPipeline` only strings them together for the CLI, the
benchmarks and training validation. Nodes call the same stages one per node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from . import latents as L
from . import masks as M
from . import preserve as PV
from .errors import InputError
from .conditioning import PromptEmbeds, check_prompt_text, check_text_length, encode_prompt_pieces
from .geometry import VAE_AREA, VL_AREA, PadRecord, check_size, crop_back, default_output_size, pad_to_multiple
from .images import pil_to_tensor, tensor_to_pil
from .lora.schedule import model_schedule
from .model import FireRedModel
from .references import (RefImages, RefLatents, encode_image, encode_references, prepare_references,
                         resize_lanczos, vae_pixels)
from .sampling import DIVERGED, StepHook, StepInfo, make_sigmas, noised_start, sample, transformer_denoiser
from .speed import RunSettings
from .limits import check, require_finite


@dataclass
class EditResult:
    """Decoded images (None for ``output="latent"``) and the final packed latents [B, L, 64]."""

    images: list[Image.Image] | None
    latents: torch.Tensor
    width: int
    height: int
    stats: dict | None = None
    masks: torch.Tensor | None = None  # preserve="auto": the estimated edit regions [B, H, W] (1 = edited)
    notes: list[str] = field(default_factory=list)  # preserve="auto": one line per image
    reference_latent: torch.Tensor | None = None  # the last reference's packed tokens [1, L, 64] ...
    reference_size: tuple[int, int] | None = None  # ... at this (width, height)
    generation_size: tuple[int, int] | None = None  # (width, height) the latents were sampled at


def make_noise(batch: int, width: int, height: int, seed: int | Sequence[int] | torch.Generator,
               dtype: torch.dtype, device) -> torch.Tensor:
    """Packed Gaussian noise from a CPU generator, so a seed gives the same image on every device.

    One seed draws the whole batch from one generator (as the reference with ``num_images_per_prompt``);
    a list of seeds draws each sample from its own.
    """
    shape = (1, 1, 16, height // L.VAE_SCALE, width // L.VAE_SCALE)
    for s in seed if isinstance(seed, (list, tuple)) else [] if isinstance(seed, torch.Generator) else [seed]:
        check({"seed": int(s)})
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch:
            raise InputError(f"{len(seed)} seeds given for a batch of {batch}", field="seed")
        noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=dtype)
                           for s in seed])
    else:
        gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
        noise = torch.randn((batch, *shape[1:]), generator=gen, dtype=dtype)
    return L.pack(noise).to(device)


@torch.no_grad()
def decode_latents(vae, tokens: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Packed model-space latents -> images [B, 3, H, W] in 0..1 (float32, on the VAE's device)."""
    z = L.denormalize(L.unpack(tokens, height, width).to(vae.dtype), vae.config)
    return decode_raw(vae, z)


@torch.no_grad()
def decode_raw(vae, z: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents [B, 16, 1, h, w] -> images [B, 3, H, W] in 0..1 (NaN / inf latents are refused: they would
    decode to a black image)."""
    require_finite(z, "the latent to decode", DIVERGED)
    image = vae.decode(z.to(vae.dtype), return_dict=False)[0][:, :, 0]
    return (image * 0.5 + 0.5).clamp(0, 1).float()


def pad_image(image: Image.Image) -> tuple[Image.Image, PadRecord]:
    """Pad a PIL image to multiples of 16 (edges repeated) with the record that crops it back."""
    padded, record = pad_to_multiple(pil_to_tensor(image)[None])
    return tensor_to_pil(padded[0]), record


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = images.cpu().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]


def encode_instructions(model: FireRedModel, prompts: list[str], refs: RefImages | None,
                        mode: str = "pipeline") -> PromptEmbeds:
    """The conditioning stage: prompt embeddings; with the model's embedding cache on, a (model, prompt, images,
    mode) is encoded once."""
    images = refs.vl_images if refs is not None and len(refs) else None

    def encode(todo: list[str]) -> list[torch.Tensor]:
        with model.use("text_encoder") as te:
            return encode_prompt_pieces(te, model.processor, todo, images, mode=mode, device=model.device)
    cache = model.settings.embed_cache_obj()
    if cache is None:
        return PromptEmbeds.from_pieces(encode(prompts))
    return cache.encode(encode, model.prompt_fingerprint(), prompts, images, mode, device=model.device,
                        dtype=model.prepared("text_encoder").dtype)


def encode_reference_latents(model: FireRedModel, refs: RefImages | None, dtype: torch.dtype,
                             last: torch.Tensor | None = None) -> RefLatents:
    """The references' VAE stage: packed tokens of every reference (empty for text-to-image).

    ``last``: packed model-space tokens [1, L, 64] of the last reference at its VAE size, used instead of encoding
    it (an edit chain's previous round); ignored when its token count does not fit that size.
    """
    if refs is None or len(refs) == 0:
        return RefLatents(None, [])
    shapes = [L.token_grid(h, w) for w, h in refs.vae_sizes]
    if last is not None and last.shape[1] == int(np.prod(shapes[-1])):
        head = RefLatents(None, [])
        if len(refs) > 1:
            with model.use("vae") as vae:
                head = encode_references(vae, RefImages(refs.vl_images[:-1], refs.vae_pixels[:-1],
                                                        refs.vae_sizes[:-1]), device=model.device, dtype=dtype)
        last = last.to(device=model.device, dtype=dtype)
        return RefLatents(last if head.tokens is None else torch.cat([head.tokens, last], 1), shapes)
    with model.use("vae") as vae:
        return encode_references(vae, refs, device=model.device, dtype=dtype)


def decode_to_pixels(model: FireRedModel, tokens: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The decode stage: packed model-space latents -> images [B, 3, H, W] in 0..1."""
    with model.use("vae") as vae:
        return decode_latents(vae, tokens, width, height)


def denoise_latents(model: FireRedModel, settings: RunSettings | None, cond: PromptEmbeds, uncond: PromptEmbeds | None,
                    ref: RefLatents, width: int, height: int, seed: int | Sequence[int] | torch.Generator,
                    steps: int, true_cfg: float, shift: float | None = None, denoise: float = 1.0,
                    init: torch.Tensor | None = None, callback: Callable[[StepInfo], None] | None = None,
                    latent_hook: Callable[[torch.Tensor], StepHook] | None = None,
                    sigmas: torch.Tensor | None = None) -> tuple[torch.Tensor, dict | None]:
    """The sampling stage: noise (from a CPU generator) -> packed model-space latents [B, L, 64].

    One sample per row of ``cond``. With ``denoise`` < 1, ``init`` (packed, model space) is noised to the first
    sigma of the shortened schedule and sampling starts there. ``latent_hook``, given the drawn noise, returns the
    per-step hook of :func:`sampling.sample` (e.g. :func:`masks.blend_hook`). Returns the latents and the
    block-cache report. ``sigmas`` (a distilled LoRA's fixed schedule, already cut to ``denoise``) replace the
    checkpoint's schedule for ``steps`` / ``shift`` / ``denoise``.
    """
    batch, dtype = cond.embeds.shape[0], cond.embeds.dtype
    check({"steps": steps, "true_cfg": true_cfg, "denoise": denoise, "shift": shift})
    noise = make_noise(batch, width, height, seed, dtype, model.device)
    img_shapes = [[L.token_grid(height, width), *ref.shapes]]
    check_text_length(cond.embeds.shape[1], img_shapes[0])
    if sigmas is None:
        sigmas = make_sigmas(steps, noise.shape[1], model.scheduler_config, shift=shift, denoise=denoise)
    start = noise
    if init is not None and denoise < 1.0:
        require_finite(init, "the input latent")
        init = init.to(device=model.device, dtype=dtype).expand(batch, -1, -1)
        start = noised_start(init, noise, sigmas[0])
    settings = settings or RunSettings()
    block_cache = settings.new_block_cache()
    with model.use("transformer") as transformer:
        denoiser = transformer_denoiser(transformer, ref, img_shapes, block_cache=block_cache)
        latents = sample(denoiser, start, sigmas, cond, uncond, true_cfg, callback, batched_cfg=settings.batched_cfg,
                         step_hook=latent_hook(noise) if latent_hook is not None else None)
    return latents, ({"block_cache": block_cache.report()} if block_cache is not None else None)


class EditPipeline:
    """Instruction-driven editing with a :class:`FireRedModel` (FireRed's official settings by default).

    Model-level speed settings (quantisation, compile, block swap, VAE tiling, embedding cache) are the model's
    (``load_model(..., settings=ModelSettings(...))``); ``settings`` here are the run-level ones.
    """

    def __init__(self, model: FireRedModel, settings: RunSettings | None = None):
        self.model = model
        self.settings = settings or RunSettings()

    def encode_prompts(self, prompts: list[str], refs: RefImages | None, mode: str = "pipeline") -> PromptEmbeds:
        return encode_instructions(self.model, prompts, refs, mode)

    def encode_references(self, refs: RefImages | None, dtype: torch.dtype,
                          last: torch.Tensor | None = None) -> RefLatents:
        return encode_reference_latents(self.model, refs, dtype, last)

    def source_latents(self, refs: RefImages, ref: RefLatents, image: Image.Image, width: int, height: int,
                       dtype: torch.dtype) -> torch.Tensor:
        """The edited (last) image's packed model-space latents [1, L, 64] at the generation size: the last
        reference's own tokens when it was encoded at exactly that size (always so on the exact-size path), else an
        encode of a copy resized to it."""
        if refs.vae_sizes[-1] == (width, height):
            return ref.tokens[:, -int(np.prod(ref.shapes[-1])):]
        if image.size != (width, height):
            image = resize_lanczos(image, width, height)
        with self.model.use("vae") as vae:
            z = encode_image(vae, vae_pixels(image).to(device=self.model.device, dtype=vae.dtype))
            return L.pack(L.normalize(z, vae.config)).to(dtype)

    @torch.inference_mode()
    def edit(
        self,
        images: Sequence[Image.Image] | None,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = " ",
        steps: int = 40,
        true_cfg: float = 4.0,
        seed: int | Sequence[int] | torch.Generator = 0,
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
        vl_area: float = VL_AREA,
        vae_area: float = VAE_AREA,
        prompt_mode: str = "pipeline",
        shift: float | None = None,
        match_input: bool = False,
        output: str = "pil",
        callback: Callable[[StepInfo], None] | None = None,
        mask: torch.Tensor | Image.Image | None = None,
        feather: int = 0,
        color_match: str = "off",
        preserve: str = "off",
        preserve_color: str = "fit",
        reference_latent: torch.Tensor | None = None,
        sigmas: torch.Tensor | None = None,
    ) -> EditResult:
        """Edit ``images`` (0 = text-to-image, 1-3 native) following ``prompt``.

        Args:
            prompt: one instruction, or several (a batch; each gets ``num_images`` samples).
            negative_prompt: encoded with the same images; ``None`` or ``true_cfg <= 1`` disables true CFG.
            seed: an int (one CPU generator for the batch), a list of ints (one per sample) or a generator.
            width, height: output size, multiples of 16; default ~1 MP at the last image's aspect ratio.
            vl_area, vae_area: target areas of the references for the VL encoder and the VAE.
            shift: None for the checkpoint's dynamic shift, or a constant shift.
            match_input: output exactly the last image's size with no zoom or shift: every image is padded to a
                multiple of 16 (edges repeated, padding recorded) and VAE-encoded at that size without resizing,
                the output is made at the last image's padded size and cropped back. ``width``/``height`` and
                ``vae_area`` are then unused.
            output: ``pil`` to decode, ``latent`` to return the packed latents only.
            mask: confines the edit of the last image (``masks``: 1 = may change; any size, stretched to the
                image; one mask or one per output image). The output then has the last image's size and every
                pixel outside the mask is the input's own.
            feather: pixels over which the composite fades in inside the mask's border.
            color_match: ``off``, ``mean-std`` or ``histogram`` (``masks.color_match``).
            preserve: ``auto`` keeps every pixel the edit did not really change (``preserve``: the region is
                estimated from the input and the output, no painted mask); the output has the last image's size,
                ``masks`` and ``notes`` say what was kept. When the estimate is unsure the edit is returned whole.
            preserve_color: with ``preserve="auto"``: ``fit`` (remove the fitted global colour drift, default),
                ``off``, ``mean-std`` or ``histogram``; ``feather`` applies as for a mask.
            reference_latent: packed model-space tokens [1, L, 64] of the last image at its VAE size, used
                instead of encoding it (edit chains, ``chains.edit_chain``).
            sigmas: a fixed schedule (``steps + 1`` values down to 0) instead of the checkpoint's; ``shift`` is then
                unused. By default a distilled LoRA's saved schedule (``model.lora_schedule``) when ``steps`` is its
                step count and no ``shift`` is given.
        """
        check({"steps": steps, "true_cfg": true_cfg, "width": width, "height": height, "num_images": num_images,
               "vl_area": vl_area, "vae_area": vae_area, "shift": shift})
        prompts = [check_prompt_text(p) for p in ([prompt] if isinstance(prompt, str) else list(prompt))]
        if negative_prompt is not None:
            for neg in [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt:
                check_prompt_text(neg, "negative prompt", "negative_prompt")
        images = list(images or [])
        if preserve not in PV.PRESERVE_MODES:
            raise InputError(f"preserve {preserve!r} is not one of {PV.PRESERVE_MODES}", field="preserve")
        if preserve == "auto" and (mask is not None or not images):
            raise InputError("preserve auto needs an image to edit and no painted mask (the mask already says "
                             "what to keep)", field="preserve")
        original = pil_to_tensor(images[-1])[None] if preserve == "auto" else None
        source = src_mask = None
        if mask is not None:
            if not images:
                raise M.MaskError("a mask needs an image to edit (the mask applies to the last image)")
            source = pil_to_tensor(images[-1])[None]
            M.warn_if_empty(mask, "masked edit")
            src_mask = M.fit_batch(M.resize_mask(mask, source.shape[2], source.shape[1]),
                                   len(prompts) * num_images)
        record = None
        if match_input:
            if not images:
                raise InputError("match_input needs at least one image", field="match_input")
            images, records = zip(*(pad_image(img) for img in images))
            record = records[-1]
            width, height = record.padded_width, record.padded_height
            refs = prepare_references(list(images), vl_area, vae_sizes=[(r.padded_width, r.padded_height)
                                                                        for r in records])
        else:
            refs = prepare_references(images, vl_area, vae_area) if images else None
        if width is None or height is None:
            dw, dh = default_output_size(refs.source_sizes[-1] if refs else None)
            width, height = width or dw, height or dh
        check_size(width, height)
        do_cfg = negative_prompt is not None and true_cfg > 1.0
        schedule = model_schedule(self.model)
        if sigmas is None and shift is None and schedule is not None and steps == schedule.steps:
            sigmas = schedule.tensor()  # a distilled LoRA samples on the sigmas it learnt

        cond = self.encode_prompts(prompts, refs, prompt_mode).repeat(num_images)
        uncond = None
        if do_cfg:
            negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            uncond = self.encode_prompts(negs, refs, prompt_mode).repeat(num_images)
        dtype = cond.embeds.dtype
        ref = self.encode_references(refs, dtype, reference_latent)

        hook = None
        if src_mask is not None:
            gen_mask = (pad_to_multiple(src_mask[..., None])[0][..., 0] if record is not None
                        else M.resize_mask(src_mask, width, height))
            hook = M.blend_hook(self.source_latents(refs, ref, images[-1], width, height, dtype),
                                M.token_mask(gen_mask))
        latents, stats = denoise_latents(self.model, self.settings, cond, uncond, ref, width, height, seed, steps,
                                         true_cfg, shift=shift, callback=callback, latent_hook=hook,
                                         sigmas=sigmas)
        gen_size = (width, height)
        last_ref = (ref.tokens[:, -int(np.prod(ref.shapes[-1])):], refs.vae_sizes[-1]) if refs else (None, None)
        if output == "latent":
            return EditResult(None, latents, width, height, stats, None, [], *last_ref, gen_size)
        pixels = decode_to_pixels(self.model, latents, width, height)
        if record is not None:
            pixels = crop_back(pixels.permute(0, 2, 3, 1), record).permute(0, 3, 1, 2)
            width, height = record.width, record.height
        if source is not None:
            height, width = source.shape[1:3]
            edited = M.resize_image(pixels.permute(0, 2, 3, 1).cpu(), width, height)
            pixels = M.finish(edited, source, src_mask, feather, color_match).permute(0, 3, 1, 2)
        masks, notes = None, []
        if original is not None:
            height, width = original.shape[1:3]
            out, masks, notes = PV.preserve_batch(original, pixels.permute(0, 2, 3, 1).cpu(), feather,
                                                  preserve_color)
            pixels = out.permute(0, 3, 1, 2)
        return EditResult(to_pil(pixels), latents, width, height, stats, masks, notes, *last_ref, gen_size)
