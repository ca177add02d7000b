"""What one row's loss is: flow matching (plus the identity term when switched on), Diffusion-DPO on a pair, or
DiffusionNFT on the model's own rollouts.

The trainer draws the row's sigma and noise; this module turns them into a loss and the statistics to log
(``identity_distance``, ``dpo_margin``, ``dpo_accuracy``), so the trainer stays the loop.
"""

from __future__ import annotations

import math

import torch

from ..sampling import noised_start, transformer_denoiser
from .config import ConfigError, TrainConfig
from .identity import IdentityObjective, train_size
from .losses import flow_matching_loss
from .nft import STATE_NAME, NFTObjective
from .preference import PreferenceObjective, rejected_latents
from .proven import warn_outside_proven


class RowObjective:
    def __init__(self, cfg: TrainConfig, model, module: torch.nn.Module, device: torch.device):
        self.cfg, self.model, self.device = cfg, model, device
        self.preference = None
        self.identity = None
        self.nft = None
        warn_outside_proven(cfg)
        self.distill = None
        if cfg.distill.enabled:  # the teacher's CFG path -> a few-step student (distill.py)
            from .distill_setup import build_objective, config_problem

            if config_problem(cfg):
                raise ConfigError(config_problem(cfg))
            self.distill = build_objective(cfg, model, module, device)
        if cfg.nft.enabled:
            if cfg.preference.enabled or cfg.identity.enabled:
                raise ConfigError("nft.enabled trains on the model's own rollouts: switch preference.enabled and "
                                 "identity.enabled off")
            self.nft = NFTObjective(cfg.nft, model, module, cfg.seed, cfg.timesteps, cfg.outlier, cfg.output_dir)
        if cfg.preference.enabled:
            if cfg.variants.inverse_rate > 0:
                raise ConfigError("preference pairs are (target, rejected) outputs of the forward edit: set "
                                 "variants.inverse_rate: 0 with preference.enabled")
            self.preference = PreferenceObjective(cfg.preference, module, cfg.method, cfg.outlier)
        if cfg.identity.enabled or cfg.preference.enabled or cfg.nft.enabled:
            model.vae.requires_grad_(False)
        if cfg.identity.enabled:
            self.identity = IdentityObjective(cfg.identity, model.vae).to(device)

    def row_loss(self, transformer, sample, inputs, noise: torch.Tensor, sigma: torch.Tensor, step: int = 0,
                 pos: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
        if self.distill is not None:  # draws its own noise from (seed, step, pos)
            return self.distill.row_loss(transformer, sample, inputs, step, pos)
        if self.nft is not None:  # draws its own rollouts, noise and sigmas from (seed, step, pos)
            return self.nft.row_loss(transformer, sample, inputs, step, pos)
        if self.preference is not None:
            x0_l = rejected_latents(self.model.vae, sample, train_size(inputs.img_shapes), self.device)
            loss, stats = self.preference.row_loss(transformer, inputs, x0_l, noise, sigma)
            return loss, stats.as_dict()
        xt = noised_start(inputs.x0, noise, sigma)
        pred = transformer_denoiser(transformer, inputs.ref, inputs.img_shapes)(xt, sigma, inputs.cond, "cond")
        loss, _ = flow_matching_loss(pred, noise, inputs.x0, sigma, self.cfg.loss_weighting, self.cfg.outlier)
        stats: dict[str, float] = {}
        if self.identity is not None:
            extra, stats = self.identity.row_loss(sample, inputs, xt, sigma, pred)
            loss = loss + extra
        return loss, stats

    def after_prepare(self, acc, transformer: torch.nn.Module) -> None:
        """Called once the trained transformer is wrapped (DDP / FSDP): the passes that run it besides the trained
        forward (NFT's old policy, the DPO reference) go through the wrapper."""
        if self.nft is not None:
            self.nft.after_prepare(transformer)
        if self.preference is not None:
            self.preference.reference.after_prepare(acc)
        if self.distill is not None:
            self.distill.transformer = transformer
            self.distill.reference.after_prepare(acc)

    def input_step(self, step: int) -> int:
        """The step whose draws make a row's inputs: NFT trains a whole round on its first step's inputs."""
        return step if self.nft is None else self.nft.round_start(step)

    def after_step(self) -> None:
        """Called after each optimizer step (the NFT old policy follows the trained weights)."""
        if self.nft is not None:
            self.nft.after_step()

    def extra_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Tensors a checkpoint must keep for an exact resume, by file stem."""
        return {} if self.nft is None else {STATE_NAME: self.nft.state()}

    def load_extra_state(self, extra: dict[str, dict[str, torch.Tensor]], where: str) -> None:
        if self.nft is not None:
            self.nft.load_state(extra.get(STATE_NAME), where)

    def export_metadata(self) -> dict[str, str]:
        """Metadata the exported LoRA carries (a distilled LoRA's sampling schedule)."""
        if self.distill is None:
            return {}
        from .distill import export_schedule

        return export_schedule(self.cfg.distill, self.model.scheduler_config).metadata()

    @property
    def stat_keys(self) -> tuple[str, ...]:
        """The statistics every row reports (the same on every process, so they can be gathered)."""
        if self.nft is not None:
            return ("nft_reward", "nft_reward_std")
        if self.preference is not None:
            return ("dpo_accuracy", "dpo_margin")
        if self.distill is not None:
            return ("distill_velocity_ms",)
        return ("identity_distance",) if self.identity is not None else ()


def mean_stats(rows: list[dict[str, float]], keys: tuple[str, ...]) -> torch.Tensor:
    """Per key, the mean over the rows that measured it (NaN when none did): one value per key."""
    out = []
    for key in keys:
        values = [r[key] for r in rows if key in r and not math.isnan(r[key])]
        out.append(sum(values) / len(values) if values else math.nan)
    return torch.tensor(out, dtype=torch.float64)
