"""Batched true CFG: the conditional and unconditional passes as one forward of twice the batch.

The two prompts usually differ in length, so both are right-padded to a common length and every sample carries its
own mask (the joint attention then ignores the padding keys; text RoPE positions of valid tokens do not move). When
the doubled batch does not fit on the device, the sampler falls back to two passes for the rest of the run.
"""

from __future__ import annotations

import logging

import torch

from .conditioning import PromptEmbeds

log = logging.getLogger(__name__)


def stack_prompts(*prompts: PromptEmbeds) -> PromptEmbeds:
    """Concatenate along the batch, padding to the longest; the mask is None only when nothing is padded."""
    return PromptEmbeds.from_pieces([piece for p in prompts for piece in p.pieces()])


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class BatchedCFG:
    """Calls ``denoiser`` once on [x, x] with [cond, uncond]; remembers an out-of-memory and stops batching."""

    def __init__(self, cond: PromptEmbeds, uncond: PromptEmbeds):
        self.cond, self.uncond = cond, uncond
        self.both = stack_prompts(cond, uncond)
        self.enabled = True

    def __call__(self, denoiser, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.enabled:
            try:
                v = denoiser(torch.cat([x, x]), torch.cat([t, t]), self.both, "cfg")
                return v.chunk(2)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not _is_oom(exc):
                    raise
                log.warning("batched CFG ran out of memory; using two passes for the rest of the run")
                self.enabled = False
                if x.device.type == "cuda":
                    torch.cuda.empty_cache()
        return denoiser(x, t, self.cond, "cond"), denoiser(x, t, self.uncond, "uncond")
