"""Flow-matching sampling: the sigma schedule, the Euler loop and true classifier-free guidance.

The schedule is the one of the checkpoint's ``FlowMatchEulerDiscreteScheduler`` config (dynamic shift with ``mu``
from the number of output tokens, exponential time shift, terminal stretch, final 0); the scheduler class itself
computes it so the numbers are the reference's. The Euler update and true CFG with per-token norm rescaling are
written out here because they are the loop every feature (previews, interruption, block cache) hooks into.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from .conditioning import PromptEmbeds
from .errors import InputError
from .references import RefLatents
from .limits import finite_number, require_finite

# The scheduler config shipped with Qwen-Image / FireRed-Image-Edit (FlowMatchEulerDiscreteScheduler).
SCHEDULER_CONFIG: dict = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
DIVERGED = ("the edit would be an all-black image. Usual causes: a LoRA with NaN or huge weights, an extreme "
            "strength or true_cfg, a NaN input latent, or fp16 overflow (use bf16)")


def compute_mu(image_seq_len: int, scheduler_config: dict) -> float:
    """Resolution-dependent shift: linear in the output token count between (base_seq, base_shift) and (max...)."""
    base_seq = scheduler_config.get("base_image_seq_len", 256)
    max_seq = scheduler_config.get("max_image_seq_len", 4096)
    base_shift = scheduler_config.get("base_shift", 0.5)
    max_shift = scheduler_config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_seq - base_seq)
    return image_seq_len * m + (base_shift - m * base_seq)


def make_sigmas(steps: int, image_seq_len: int, scheduler_config: dict, shift: float | None = None,
                denoise: float = 1.0) -> torch.Tensor:
    """Sigmas [n + 1] from high noise to 0 for ``steps`` steps (the last ``denoise`` fraction when < 1).

    ``shift=None`` uses the checkpoint's dynamic shift; a number gives a constant shift (ComfyUI's AuraFlow style).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if steps < 1:
        raise InputError(f"steps={steps} must be at least 1", field="steps")
    if not 0.0 < denoise <= 1.0:
        raise InputError(f"denoise={denoise} must be in (0, 1]", field="denoise")
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    total = steps if denoise >= 1.0 else max(steps, int(round(steps / denoise)))
    if shift is not None:
        config.update(use_dynamic_shifting=False, shift=float(shift))
    if total == 1:
        # The terminal stretch divides by (1 - last sigma), which is 0 for a one-sigma schedule (NaN in diffusers).
        config["shift_terminal"] = None
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    base = np.linspace(1.0, 1 / total, total)
    kwargs = {} if shift is not None else {"mu": compute_mu(image_seq_len, scheduler_config)}
    scheduler.set_timesteps(sigmas=base, device="cpu", **kwargs)
    return scheduler.sigmas[-(steps + 1):].clone()


def noised_start(init: torch.Tensor, noise: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """The flow-matching point at ``sigma`` between ``init`` (sigma 0) and ``noise`` (sigma 1), as the scheduler's
    ``scale_noise``: ``sigma * noise + (1 - sigma) * init``, computed in float32. ``sigma`` is one value or one per
    row (training's noisy inputs); the start of a partial denoise uses one."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=noise.device)
    if sigma.dim() > 0:
        sigma = sigma.reshape(-1, *([1] * (noise.dim() - 1)))
    return (sigma * noise.float() + (1.0 - sigma) * init.float()).to(noise.dtype)


def apply_true_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """``uncond + s (cond - uncond)`` rescaled per token to the norm of ``cond`` (over the channel dim)."""
    comb = uncond + scale * (cond - uncond)
    return comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))


@dataclass
class StepInfo:
    """What a per-step callback sees. Raising from the callback aborts sampling (interruption).

    ``latents`` are the tokens after the step (at ``sigma``); ``denoised`` is the clean-image estimate the step was
    taken from (``x - sigma_before * v``), ready for a preview without another model call.
    """

    step: int
    total: int
    sigma: float
    latents: torch.Tensor
    denoised: torch.Tensor | None = None


# Called after every Euler step with (step index, the new sigma, the latents there); returns the latents to go on
# from. The one place a feature may steer the trajectory (masked edits hold unmasked tokens to the source's).
StepHook = Callable[[int, float, torch.Tensor], torch.Tensor]


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, cond: PromptEmbeds, branch: str) -> torch.Tensor: ...


def transformer_denoiser(transformer, ref: RefLatents, img_shapes: list, attention_kwargs: dict | None = None,
                         block_cache=None) -> Denoiser:
    """Velocity of the noisy tokens: reference tokens appended after them, prediction sliced back.

    ``block_cache`` (a :class:`firered_core.block_cache.BlockCache`) runs the transformer through the block-level forward
    with that branch's cache state; without it the transformer's own forward runs.
    """
    def run(x: torch.Tensor, timestep: torch.Tensor, cond: PromptEmbeds, branch: str) -> torch.Tensor:
        inp = x if ref.tokens is None else torch.cat([x, ref.tokens.expand(x.shape[0], -1, -1)], dim=1)
        if block_cache is not None:
            from .transformer_forward import run_transformer

            out = run_transformer(transformer, inp, cond.embeds, cond.mask, timestep, img_shapes * x.shape[0],
                                  attention_kwargs, block_cache.loop(branch))
            return out[:, : x.shape[1]]
        ctx = transformer.cache_context(branch) if hasattr(transformer, "cache_context") else contextlib.nullcontext()
        with ctx:
            out = transformer(hidden_states=inp, timestep=timestep, encoder_hidden_states=cond.embeds,
                              encoder_hidden_states_mask=cond.mask, img_shapes=img_shapes * x.shape[0],
                              attention_kwargs=attention_kwargs or {}, return_dict=False)[0]
        return out[:, : x.shape[1]]
    return run


@torch.no_grad()
def sample(denoiser: Denoiser, latents: torch.Tensor, sigmas: torch.Tensor, cond: PromptEmbeds,
           uncond: PromptEmbeds | None = None, true_cfg: float = 1.0,
           callback: Callable[[StepInfo], None] | None = None, batched_cfg: bool = False,
           step_hook: StepHook | None = None) -> torch.Tensor:
    """Euler integration of the flow from ``sigmas[0]`` to ``sigmas[-1]``.

    True CFG runs when ``uncond`` is given and ``true_cfg > 1``; ``batched_cfg`` runs both branches in one forward
    (``cfg.BatchedCFG``). The update is done in float32 and cast back to the model's dtype, as the reference
    scheduler does. ``step_hook`` may replace the latents after each step (before the callback sees them).
    """
    finite_number(true_cfg, "true_cfg")
    do_cfg = uncond is not None and true_cfg > 1.0
    both = None
    if do_cfg and batched_cfg:
        from .cfg import BatchedCFG

        both = BatchedCFG(cond, uncond)
    timesteps = sigmas[:-1] * 1000.0
    n = len(timesteps)
    for i in range(n):
        t = timesteps[i].expand(latents.shape[0]).to(latents.dtype) / 1000
        if both is not None:
            v = apply_true_cfg(*both(denoiser, latents, t.to(latents.device)), true_cfg)
        else:
            v = denoiser(latents, t.to(latents.device), cond, "cond")
            if do_cfg:
                v = apply_true_cfg(v, denoiser(latents, t.to(latents.device), uncond, "uncond"), true_cfg)
        require_finite(v, f"the model's prediction at step {i + 1} of {n}", DIVERGED)
        dt = (sigmas[i + 1] - sigmas[i]).to(latents.device)
        x = latents
        latents = (x.to(torch.float32) + dt * v).to(v.dtype)
        if step_hook is not None:
            latents = step_hook(i, float(sigmas[i + 1]), latents)
        if callback is not None:
            denoised = x.float() - sigmas[i].to(x.device) * v.float()
            callback(StepInfo(i, n, float(sigmas[i + 1]), latents, denoised))
    return latents
