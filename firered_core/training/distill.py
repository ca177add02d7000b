"""Few-step, guidance-free distillation: a LoRA that samples in N steps (8, 4) with CFG off what the teacher samples
in ``teacher_steps`` (40) steps with true CFG (4).

Method: guided trajectory distillation on the teacher's probability-flow ODE, in one stage. It follows Meng et al.
2023, "On Distillation of Guided Diffusion Models" (CVPR, arXiv:2210.03142): the guided teacher's output (here
FireRed's true CFG with norm rescale) becomes the target of a student without guidance; and Salimans & Ho 2022,
"Progressive Distillation for Fast Sampling of Diffusion Models" (ICLR, arXiv:2202.00512): one student step must
land where several teacher steps from the same state land. We take the teacher's whole path at once instead of
halving the steps in rounds (the "trajectory" form of Luhman & Luhman 2021, arXiv:2101.02388, kept multi-step):

1. The student's schedule is fixed: ``s_0 > s_1 > ... > s_N = 0`` (:func:`student_sigmas`, the checkpoint's
   schedule for N steps at ``schedule_tokens`` output tokens, or a constant ``shift``). It is saved in the exported
   LoRA (:mod:`firered_core.lora.schedule`), so inference uses exactly the sigmas the LoRA learnt.
2. Per training row, the teacher (the frozen base with the LoRA switched off, as DPO's reference: no second copy of
   the weights) integrates the ODE from fresh noise at ``s_0`` to 0 with
   ``teacher_steps`` Euler steps and true CFG (``K = teacher_steps / N`` sub-steps per student interval, spaced
   evenly in sigma), keeping its states ``x_{s_i}`` on the student's sigmas. Its conditioning is the row's: the
   instruction and references of the edit row (the target image is never used: the teacher makes the targets).
3. The student, CFG off, takes one Euler step from each teacher state ``x_{s_i}``; the loss is its velocity's mean
   square distance to the teacher's mean velocity over the interval,
   ``(x_{s_{i+1}} - x_{s_i}) / (s_{i+1} - s_i)``, i.e. the x-space step error divided by the step size, so that
   all N intervals weigh alike (the x-space error of interval i is ``(s_i - s_{i+1})^2`` times it).

Why this method and not distribution matching (DMD2) or consistency training: it needs no second trainable network
(DMD2's fake score), no discriminator and no real images, and its loss is a plain regression whose minimum is the
teacher's own N-step map, which makes it stable on tiny models and exactly resumable. Its known weakness (the
student is trained on teacher states, not on its own) is what a consistency or adversarial stage would address.

``segments`` (0 = all) trains on a random subset of the N intervals per row, to bound the student batch at full
size; the teacher path is computed whole either way. Every random draw (noise, segments) is a function of
``(seed, step, row position)``, so resume is exact and 2 processes equal 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field, with_config

from ..conditioning import PromptEmbeds
from ..lora.schedule import LoraSchedule
from ..sampling import make_sigmas, sample, transformer_denoiser
from ..limits import CONFIG
from .seeding import row_generator, row_rng


@with_config(CONFIG)
@dataclass
class DistillConfig:
    enabled: bool = False
    steps: Annotated[int, Field(ge=1, le=64)] = 8  # the student's steps (N)
    teacher_steps: Annotated[int, Field(ge=1, le=1000)] = 40  # a multiple of steps
    teacher_cfg: Annotated[float, Field(ge=1.0, le=100.0)] = 4.0  # true CFG of the teacher (1 = off)
    negative_prompt: str = " "  # the teacher's negative, encoded with the row's references (online inputs)
    shift: Annotated[float, Field(gt=0.0, le=20.0)] | None = None  # student schedule: None = dynamic shift
    schedule_tokens: Annotated[int, Field(ge=1)] = 4096  # output tokens the dynamic shift is taken at (1 MP)
    segments: Annotated[int, Field(ge=0)] = 0  # intervals trained per row and step (0 = all N)
    teacher_lora: str | None = None  # a LoRA merged into the teacher (and the student's base), e.g. a fine-tune's


def student_sigmas(cfg: DistillConfig, scheduler_config: dict) -> torch.Tensor:
    """The student's fixed schedule: ``steps + 1`` sigmas, the last 0 (float32)."""
    return make_sigmas(cfg.steps, cfg.schedule_tokens, scheduler_config, shift=cfg.shift).float()


def teacher_sigmas(student: torch.Tensor, substeps: int) -> torch.Tensor:
    """Each student interval split into ``substeps`` even ones: ``len(student) - 1) * substeps + 1`` sigmas that
    contain every student sigma (at indices ``0, substeps, 2 substeps, ...``)."""
    parts = [torch.linspace(float(a), float(b), substeps + 1, dtype=torch.float64)[:-1]
             for a, b in zip(student[:-1], student[1:])]
    return torch.cat([*parts, student[-1:].double()]).float()


def export_schedule(cfg: DistillConfig, scheduler_config: dict) -> LoraSchedule:
    """What the exported LoRA carries: its steps and sigmas, CFG off, and the teacher it was distilled from."""
    sig = student_sigmas(cfg, scheduler_config)
    return LoraSchedule(cfg.steps, tuple(float(v) for v in sig), 1.0, cfg.teacher_steps, cfg.teacher_cfg)


@torch.no_grad()
def teacher_path(denoiser, noise: torch.Tensor, sigmas: torch.Tensor, substeps: int, cond: PromptEmbeds,
                 uncond: PromptEmbeds | None, true_cfg: float) -> torch.Tensor:
    """The teacher's states on the student's sigmas: [N + 1, L, C] from ``noise`` (at ``sigmas[0]``) to the image,
    by :func:`firered_core.sampling.sample` (the inference sampler) over :func:`teacher_sigmas`."""
    fine = teacher_sigmas(sigmas, substeps)
    states = [noise]

    def keep(i: int, sigma: float, latents: torch.Tensor) -> torch.Tensor:
        if (i + 1) % substeps == 0:
            states.append(latents)
        return latents

    # both CFG branches in one forward of twice the batch (cfg.BatchedCFG; it falls back to two on out-of-memory)
    sample(denoiser, noise, fine.to(noise.device), cond, uncond, true_cfg, step_hook=keep, batched_cfg=True)
    return torch.cat(states)


def distill_loss(v_student: torch.Tensor, states: torch.Tensor, sigmas: torch.Tensor,
                 segments: torch.Tensor) -> torch.Tensor:
    """Mean over the chosen intervals of the mean square between the student's velocity and the teacher's mean
    velocity ``(x_{i+1} - x_i) / (s_{i+1} - s_i)`` (float32)."""
    dt = (sigmas[segments + 1] - sigmas[segments]).to(states.device, torch.float32).view(-1, 1, 1)
    target = (states[segments + 1].float() - states[segments].float()) / dt
    return (v_student.float() - target).square().mean()


@dataclass
class DistillObjective:
    """One row's distillation loss (see the module docstring). ``reference``: the teacher's forward
    (:class:`~firered_core.training.preference.Reference`, the LoRA-disabled base or a frozen copy)."""

    cfg: DistillConfig
    reference: object
    negative: object  # (sample, inputs) -> PromptEmbeds of the teacher's negative prompt
    scheduler_config: dict
    seed: int
    transformer: torch.nn.Module | None = None  # the prepared (DDP / FSDP) model, set by the trainer

    def __post_init__(self):
        self.sigmas = student_sigmas(self.cfg, self.scheduler_config)
        self.substeps = self.cfg.teacher_steps // self.cfg.steps

    def segments(self, step: int, pos: int) -> torch.Tensor:
        n, k = self.cfg.steps, self.cfg.segments
        if k in (0, n):
            return torch.arange(n)
        rng = row_rng(self.seed, step, pos, "distill_segments")
        return torch.as_tensor(sorted(rng.choice(n, size=k, replace=False).tolist()))

    def row_loss(self, transformer, sample_row, inputs, step: int, pos: int) -> tuple[torch.Tensor, dict]:
        x0 = inputs.x0
        noise = torch.randn(x0.shape, generator=row_generator(self.seed, step, pos, "distill")).to(x0.device)
        uncond = self.negative(sample_row, inputs) if self.cfg.teacher_cfg > 1 else None
        with self.reference.model(self.transformer or transformer) as teacher:
            states = teacher_path(transformer_denoiser(teacher, inputs.ref, inputs.img_shapes), noise, self.sigmas,
                                  self.substeps, inputs.cond, uncond, self.cfg.teacher_cfg)
        seg = self.segments(step, pos)
        n = len(seg)
        xt = states[seg].to(x0.dtype)
        sigma = self.sigmas[seg].to(x0.device)
        cond = inputs.cond
        cond = PromptEmbeds(cond.embeds.expand(n, -1, -1), None if cond.mask is None else cond.mask.expand(n, -1))
        v = transformer_denoiser(transformer, inputs.ref, inputs.img_shapes)(xt, sigma, cond, "cond")
        loss = distill_loss(v, states, self.sigmas, seg)
        # the x-space gap of the student's whole N-step path is not measured here (it needs N student calls); the
        # velocities' mean square puts the loss in proportion (loss / it: the relative error left)
        return loss, {"distill_velocity_ms": float(v.detach().float().square().mean())}
