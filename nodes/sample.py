"""The sampler: flow-matching Euler with true CFG, progress with previews, interruption at every step."""

from __future__ import annotations

import logging

from firered_core import comfy_latents as CL
from firered_core import geometry as G
from firered_core import masks as M
from firered_core import preview as P
from firered_core.lora import model_schedule
from firered_core.model import FireRedModel
from firered_core.pipeline import denoise_latents
from firered_core.references import RefLatents
from firered_core.sampling import StepInfo
from firered_core.speed import SpeedSettings
from firered_core.limits import widget

from . import _comfy, _progress
from . import speed as SP
from ._errors import blame, check_inputs, input_error
from .encode import Conditioning

SEED_MODES = ("batch", "increment")

log = logging.getLogger(__name__)


class FireRedSampler:
    NAME = "FireRed Sampler"
    DESCRIPTION = ("Generates the edited image: flow-matching Euler steps with the checkpoint's schedule and true "
                   "classifier-free guidance (FireRed defaults: 40 steps, true CFG 4). The LATENT input sets the "
                   "size; with denoise < 1 its content is the starting point. A LATENT with a noise mask (ComfyUI's "
                   "Set Latent Noise Mask on the encoded source) confines the edit: outside the mask the latents "
                   "follow the source at every step; grey mask values are edited for fewer steps.")
    CATEGORY = "FireRed"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Raw (un-normalised) 5-D latent, decodable by FireRed Decode or ComfyUI's VAE Decode.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("FIRERED_MODEL", {"tooltip": "From FireRed Model Loader."}),
                "positive": ("FIRERED_COND", {"tooltip": "The encoded instruction; its references are used."}),
                "latent": ("LATENT", {"tooltip": "Sets the output size (from FireRed Image Size, or any 16-channel "
                                                 "LATENT with sides multiple of 16 pixels); its content is used "
                                                 "when denoise < 1, or as the source of a masked edit when it "
                                                 "carries a noise mask (Set Latent Noise Mask)."}),
                "seed": ("INT", {"default": 0, **widget("seed"), "control_after_generate": True,
                                 "tooltip": "Noise seed (drawn on the CPU, so a seed gives the same image on every "
                                            "device)."}),
                "steps": ("INT", {"default": 40, **widget("steps"),
                                  "tooltip": "Denoising steps (40 official; 8 with the Lightning LoRA). A distilled "
                                             "LoRA from FireRed's trainer brings its own steps and sigmas (used "
                                             "instead)."}),
                "true_cfg": ("FLOAT", {"default": 4.0, **widget("true_cfg"), "step": 0.1, "round": 0.01,
                                       "tooltip": "True CFG scale with per-token norm rescale (4 official; 1 = "
                                                  "off, halves the time, e.g. with the Lightning LoRA; off with a "
                                                  "distilled LoRA from FireRed's trainer)."}),
                "shift": ("FLOAT", {"default": 0.0, **widget("shift"), "step": 0.05,
                                    "tooltip": "0 = the checkpoint's dynamic shift (depends on the output size); "
                                               "a value > 0 forces a constant shift (ComfyUI's native path uses 3)."}),
                "denoise": ("FLOAT", {"default": 1.0, **widget("denoise"), "step": 0.01,
                                      "tooltip": "1 = start from pure noise; less keeps that much of the input "
                                                 "latent's content."}),
                "batch_size": ("INT", {"default": 1, **widget("num_images"),
                                       "tooltip": "Images generated in one run."}),
                "seed_mode": (list(SEED_MODES), {
                    "default": "batch",
                    "tooltip": "batch: one generator for the whole batch (as the pipeline). increment: image i "
                               "uses seed + i, so each image of a sweep can be remade alone with its seed."}),
            },
            "optional": {
                "negative": ("FIRERED_COND", {"tooltip": "The encoded negative prompt (' ' officially), with the "
                                                         "same references; needed for true CFG > 1."}),
                "speed": (SP.SPEED_TYPE, {"tooltip": "From FireRed Speed Settings: batched CFG and the block cache "
                                                     "apply here (connect the same node to the model loader for "
                                                     "quantisation, compile and block swap)."}),
            },
        }

    def sample(self, model: FireRedModel, positive: Conditioning, latent: dict, seed: int, steps: int,
               true_cfg: float, shift: float, denoise: float, batch_size: int, seed_mode: str,
               negative: Conditioning | None = None, speed: SpeedSettings | None = None) -> tuple[dict]:
        check_inputs(self.NAME, {"seed": seed, "steps": steps, "true_cfg": true_cfg, "shift": shift,
                                 "denoise": denoise, "batch_size": batch_size}, {"batch_size": "num_images"})
        with blame(self.NAME, "latent"):
            samples = CL.check_raw(latent["samples"])
            width, height = CL.pixel_size(samples)
            G.check_size(width, height)
        if samples.shape[0] > 1 and batch_size not in (1, samples.shape[0]):
            raise input_error(self.NAME, "batch_size", f"the latent holds {samples.shape[0]} images; "
                              "set batch_size to 1 or to the same number")
        batch = max(batch_size, samples.shape[0])
        schedule, sigmas = model_schedule(model), None
        if schedule is not None:  # a distilled LoRA samples on its own schedule, whatever the widgets say
            if (steps, true_cfg) != (schedule.steps, schedule.true_cfg):
                log.info("%s: the model's LoRA carries its schedule (%s): steps %d and true_cfg %g are not used",
                         self.NAME, schedule.describe(), steps, true_cfg)
            steps, true_cfg, sigmas = schedule.steps, schedule.true_cfg, schedule.tensor(denoise)
        if true_cfg > 1.0 and negative is None:
            raise input_error(self.NAME, "negative", "true_cfg > 1 needs a negative conditioning (encode ' ' "
                              "with the same references), or set true_cfg to 1")
        refs = positive.refs
        if negative is not None and (negative.refs is None) != (refs is None):
            raise input_error(self.NAME, "negative", "encode the negative prompt with the same references as "
                              "the positive one (the pipeline does)")

        device = model.device
        seeds = int(seed) if seed_mode == "batch" else [int(seed) + i for i in range(batch)]
        if seed_mode == "increment":
            check_inputs(self.NAME, {"seed": seeds[-1]})  # seed + batch - 1 must still be a seed
        ref = refs.latents.to(device, positive.embeds.embeds.dtype) if refs is not None else RefLatents(None, [])
        init = CL.from_raw(samples.to(device), model.vae.config) if denoise < 1.0 else None
        cond = positive.embeds.repeat(batch).to(device)
        uncond = negative.embeds.repeat(batch).to(device) if true_cfg > 1.0 else None
        hook = None
        if latent.get("noise_mask") is not None:
            with blame(self.NAME, "latent"):
                mask = M.fit_batch(M.resize_mask(latent["noise_mask"].cpu(), width, height), batch,
                                   "latent's noise mask")
                M.warn_if_empty(mask, f"{self.NAME}: input 'latent' (its noise mask)")
                hook = M.blend_hook(CL.from_raw(samples.to(device), model.vae.config), M.token_mask(mask))
        settings = SP.for_sampler(self.NAME, model, speed)
        bar, preview = _progress.progress_bar(steps), _progress.previewer()

        def on_step(info: StepInfo) -> None:
            _progress.throw_if_interrupted()
            bar.update_absolute(info.step + 1, info.total, preview(P.tokens_to_latent(info.denoised, width, height)))

        _progress.throw_if_interrupted()
        try:
            with blame(self.NAME, "model", inputs=("steps", "denoise"), aliases={"prompt": "positive"}):
                out, stats = denoise_latents(model, settings, cond, uncond, ref, width, height, seeds, steps,
                                             true_cfg, shift=shift if shift > 0 else None, denoise=denoise,
                                             init=init, callback=on_step, latent_hook=hook, sigmas=sigmas)
            if stats is not None:
                report = stats["block_cache"]
                log.info("%s: block cache computed %d of %d blocks (%.0f%%)", self.NAME, report["computed"],
                         report["total"], 100 * report["fraction"])
            raw = CL.to_raw(out, width, height, model.vae.config)
        finally:
            _comfy.soft_empty_cache()
        return ({"samples": raw.float().to(_comfy.intermediate_device())},)


NODE_CLASS_MAPPINGS = {"FireRedSampler": FireRedSampler}
