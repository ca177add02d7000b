"""Online RL from the model's own edits: DiffusionNFT (Zheng et al. 2025, "DiffusionNFT: Online Diffusion
Reinforcement with Forward Process", arXiv:2509.16117), negative-aware fine-tuning on the forward process.

Per training row (a prompt with its reference latents), one step:

1. Rollouts: ``group_size`` G edits sampled by firered_core's own Euler sampler (:func:`firered_core.sampling.sample`,
   ``rollout_steps`` steps, no CFG: the method is CFG-free) from the old policy, in one batch sharing the prompt and
   reference latents, then decoded by the VAE.
2. Rewards: a plug-in (:mod:`firered_core.rewards`) scores each decoded image, cached per sample by content.
3. Optimality probability: the group's rewards are normalised, ``A = (R - mean_G) / (std_G + eps)`` (population
   std), and mapped to ``r = 1/2 + 1/2 clip(A / adv_clip, -1, 1)`` in [0, 1] (the paper's
   ``r = 1/2 + 1/2 clip(A / Z, -1, 1)`` with ``Z = adv_clip``, as the authors' code).
4. Forward-process loss on the rollouts' clean latents x0 (no likelihoods, no trajectories kept): fresh noise eps and
   sigma, ``x_t = (1 - sigma) x0 + sigma eps``, target velocity ``v = eps - x0``, the implicit positive and negative
   policies ``v+ = (1 - beta) v_old + beta v_theta`` and ``v- = (1 + beta) v_old - beta v_theta``, and the paper's
   objective

       L = mean_G [ r ||v+ - v||^2 + (1 - r) ||v- - v||^2 ]

   with ``||.||^2`` the per-rollout mean square (the trainer's masked flow-matching error). At ``r = 1`` only the
   positive term acts, at ``r = 0`` only the negative one; ``beta -> 0`` freezes both at ``v_old``. At
   ``v_theta = v_old`` the gradient is ``2 beta (2r - 1)(v_theta - v)``: a flow-matching pull towards rollouts better
   than their group and a push away from worse ones. Implementations differ by constant or per-sample rescalings of
   this loss (e.g. dividing by beta, an x0-space weight); none is applied here (tune ``lr`` instead).

The old policy is a lagged copy of the trained tensors (the LoRA adapter's, or the full fine-tune's trained
tensors), soft-updated after every optimizer step as ``old <- old_decay * old + (1 - old_decay) * theta`` (the
paper's soft update; ``old_decay: 0`` = the previous step's weights). Why a lagged copy rather than the LoRA-disabled
base: the old policy is the one that samples, so it must improve with training (the base would keep sampling the
untrained model), yet lag the trained weights so that ``v+`` / ``v-`` differ from ``v_theta`` and the update stays
near the data it was sampled from. Only the trained tensors are copied (for a
LoRA that is the adapter, a few MB), swapped in for the rollouts and the ``v_old`` forward, and swapped back
bit-exactly before the trained forward, so no second model is held and the autograd graph is never touched. The
copy is saved in checkpoints (``nft_old.safetensors``), so resume is exact.

Under FSDP (``use_orig_params``) the trained tensors outside a forward are views of this rank's shard, so the old
policy is kept per rank on those shards and swapped into them in place; the rollouts and the ``v_old`` pass run through
the FSDP-wrapped model, which gathers whatever the shards hold. Checkpoints gather the old policy into whole tensors
(the same file as without FSDP, so DDP and FSDP checkpoints resume each other).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
from pydantic import Field, with_config

from ..conditioning import PromptEmbeds
from ..rewards import RewardBatch, RewardConfig, build_reward
from ..sampling import make_sigmas, noised_start, sample, transformer_denoiser
from ..limits import CONFIG, Positive
from .alignment import variant_text
from .ema import EMA
from .identity import train_size
from .losses import row_errors
from .seeding import row_generator
from .timesteps import sample_sigmas

STATE_NAME = "nft_old"


@with_config(CONFIG)
@dataclass
class NFTConfig:
    enabled: bool = False
    group_size: Annotated[int, Field(ge=2, le=64)] = 4  # rollouts per prompt (G)
    rollout_steps: Annotated[int, Field(ge=1, le=100)] = 8  # sampler steps per rollout
    beta: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0  # implicit-policy strength
    adv_clip: Positive = 5.0  # normalised advantages beyond +-adv_clip map to r = 1 / 0
    std_eps: Positive = 1e-4
    old_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5  # soft update of the old (sampling) policy
    reward: RewardConfig = field(default_factory=RewardConfig)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Per-group normalised rewards ``(R - mean) / (std + eps)`` over the last dim (population std)."""
    rewards = rewards.double()
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, unbiased=False, keepdim=True)
    return (rewards - mean) / (std + eps)


def optimality_probability(advantages: torch.Tensor, adv_clip: float) -> torch.Tensor:
    """``r = 1/2 + 1/2 clip(A / adv_clip, -1, 1)`` in [0, 1]."""
    return 0.5 + 0.5 * (advantages / adv_clip).clamp(-1.0, 1.0)


def implicit_policies(v_theta: torch.Tensor, v_old: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``v+ = (1 - beta) v_old + beta v_theta`` and ``v- = (1 + beta) v_old - beta v_theta``."""
    v_old = v_old.detach()
    return (1.0 - beta) * v_old + beta * v_theta, (1.0 + beta) * v_old - beta * v_theta


def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor, r: torch.Tensor,
             beta: float, outlier: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean DiffusionNFT loss over rollouts and the per-rollout losses (see the module docstring)."""
    v_pos, v_neg = implicit_policies(v_theta, v_old, beta)
    e_pos, _ = row_errors(v_pos, noise, x0, outlier)
    e_neg, _ = row_errors(v_neg, noise, x0, outlier)
    r = r.to(e_pos.device, e_pos.dtype)
    per_row = r * e_pos + (1.0 - r) * e_neg
    return per_row.mean(), per_row.detach()


def expand_cond(cond: PromptEmbeds, n: int) -> PromptEmbeds:
    mask = None if cond.mask is None else cond.mask.expand(n, -1)
    return PromptEmbeds(cond.embeds.expand(n, -1, -1), mask)


@dataclass
class Rollouts:
    x0: torch.Tensor  # [G, L, C] clean latents
    images: torch.Tensor  # [G, 3, H, W] decoded, 0..1, CPU
    rewards: torch.Tensor  # [G]


class NFTObjective:
    """One row's NFT loss: rollouts from the old policy, rewards, the forward-process loss of the trained model."""

    def __init__(self, cfg: NFTConfig, model, module: torch.nn.Module, seed: int, timesteps, outlier: float | None,
                 output_dir: str | Path, reward=None):
        self.cfg, self.model, self.transformer = cfg, model, module
        self.seed, self.timesteps, self.outlier = seed, timesteps, outlier
        self.named = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.old: EMA | None = None  # made by after_prepare, from the tensors as the wrapper leaves them
        default_dir = Path(output_dir) / "reward_cache"
        self.reward = reward if reward is not None else build_reward(cfg.reward, default_dir)

    def after_prepare(self, transformer: torch.nn.Module) -> None:
        """Run rollouts and ``v_old`` through the prepared (DDP / FSDP-wrapped) model, and keep the old policy in the
        form the trained tensors now have (under FSDP, this rank's shards: the parameter objects stay, their data
        becomes the shard)."""
        self.transformer = transformer
        self.old = EMA(self.named, self.cfg.old_decay, warmup=False)

    # -- the old policy ---------------------------------------------------------------------------------------
    def after_step(self) -> None:
        """Soft-update the old policy towards the weights the optimizer just produced."""
        self.old.update(self.named)

    def old_policy(self):
        """The old policy in the trained tensors for the block, then the trained values back bit-exactly."""
        return self.old.applied(self.named, self.transformer)

    def state(self) -> dict[str, torch.Tensor]:
        """The old policy as whole tensors (under FSDP a collective: rank 0 gets them, the other ranks ``{}``)."""
        return self.old.whole(self.named, self.transformer)

    def load_state(self, tensors: dict[str, torch.Tensor] | None, where: str) -> None:
        from .checkpoint import CheckpointError

        if tensors is None or set(tensors) != set(self.old.shadow):
            raise CheckpointError(f"checkpoint {where} has no matching {STATE_NAME}.safetensors (the NFT old "
                                  "policy): resume an NFT run from an NFT checkpoint")
        self.old.load_whole(tensors, self.named, self.transformer)

    # -- rollouts ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollouts(self, sample_row, inputs, step: int, pos: int, old: bool = True) -> Rollouts:
        """G edits of the row from the old policy (``old=False``: the current weights), decoded and scored."""
        from ..images import load_image
        from ..pipeline import decode_latents

        g, device = self.cfg.group_size, inputs.x0.device
        start = torch.randn((g, *inputs.x0.shape[1:]), generator=row_generator(self.seed, step, pos, "rollout"))
        sigmas = make_sigmas(self.cfg.rollout_steps, inputs.x0.shape[1], self.model.scheduler_config)
        denoiser = transformer_denoiser(self.transformer, inputs.ref, inputs.img_shapes)
        with self.old_policy() if old else contextlib.nullcontext():
            x0 = sample(denoiser, start.to(device, inputs.x0.dtype), sigmas, expand_cond(inputs.cond, g))
        tw, th = train_size(inputs.img_shapes)
        images = decode_latents(self.model.vae, x0, tw, th).cpu()
        text = variant_text(sample_row, inputs.variant)
        sources = [load_image(p) for p in sample_row.sources] if not inputs.variant.startswith("inverse") else \
            [load_image(sample_row.target)]
        batch = RewardBatch(images, [text] * g, [sources] * g, [sample_row.task] * g)
        return Rollouts(x0.float(), images, self.reward(batch))

    def row_loss(self, transformer, sample_row, inputs, step: int, pos: int) -> tuple[torch.Tensor, dict[str, float]]:
        g = self.cfg.group_size
        roll = self.rollouts(sample_row, inputs, step, pos)
        r = optimality_probability(group_advantages(roll.rewards, self.cfg.std_eps), self.cfg.adv_clip)
        seq = roll.x0.shape[1]
        noise = torch.randn(roll.x0.shape, generator=row_generator(self.seed, step, pos, "noise")).to(roll.x0.device)
        sigma = sample_sigmas(self.timesteps, step, range(pos * g, pos * g + g), g, seq, self.model.scheduler_config,
                              self.seed).to(roll.x0.device)
        xt = noised_start(roll.x0, noise, sigma)
        cond = expand_cond(inputs.cond, g)
        with torch.no_grad(), self.old_policy():
            v_old = transformer_denoiser(self.transformer, inputs.ref, inputs.img_shapes)(xt, sigma, cond, "cond")
        v = transformer_denoiser(transformer, inputs.ref, inputs.img_shapes)(xt, sigma, cond, "cond")
        loss, _ = nft_loss(v, v_old, noise, roll.x0, r, self.cfg.beta, self.outlier)
        return loss, {"nft_reward": float(roll.rewards.mean()), "nft_reward_std": float(roll.rewards.std(
            unbiased=False))}
