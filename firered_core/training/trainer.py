"""The trainer: LoRA or full fine-tuning of the transformer with flow matching, on one CPU or many GPUs.

Distribution is accelerate's (:mod:`.distributed`): DDP when launched with several processes, FSDP (wrapping
``QwenImageTransformerBlock``) when ``fsdp: true``. Row inputs come from :mod:`.inputs` (online or cached), validation
grids from :mod:`.previews`, weight averaging from :mod:`.ema`. Every random choice of a step (bucket, rows, variant, alignment, sigma, noise) is a function of
``(seed, step, row position in the global batch)``, so a resumed run repeats the losses of an uninterrupted one and a
2-process run sees what a 1-process run with twice the batch sees. Each process runs its rows one at a time and
accumulates gradients (rows may differ in text length and, after alignment, in reference count).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..model import load_model
from . import checkpoint as ckpt
from .buckets import BucketSampler, bucket_key
from .config import ConfigError, TrainConfig, to_dict
from .data import load_dataset, parse_weights, require_targets
from .distill_setup import merge_teacher_lora
from .distributed import make_accelerator
from .ema import EMA
from .inputs import RowInputs, input_builder, open_embeddings
from .lowvram import LowVram
from .objective import RowObjective, mean_stats
from .seeding import row_generator
from .shards import load_full_state
from .timesteps import sample_sigmas
from .previews import image_grid, save_grid, validation_rows

log = logging.getLogger(__name__)
EVAL_STEP = 10**9  # seeds evaluation draws apart from any training step


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)  # step (1-based) -> mean loss over processes
    checkpoint: Path | None = None
    exports: dict[str, Path] = field(default_factory=dict)
    samples_per_s: float = 0.0


def discarded_modules(transformer) -> list[str]:
    """The modules whose output never reaches the prediction: the last block's text stream after its attention
    input (the text queries, their norm, the text output projection and the text MLP; only the image stream goes on
    to ``norm_out``, and text queries only shape the text tokens' outputs). Training them changes nothing, and under
    FSDP, which gives every tensor of a shard a gradient, weight decay would still move them: they are never trained.
    """
    last = f"transformer_blocks.{len(transformer.transformer_blocks) - 1}."
    heads = tuple(last + h for h in ("attn.add_q_proj", "attn.norm_added_q", "attn.to_add_out", "txt_mlp."))
    return [n for n, m in transformer.named_modules()
            if n.startswith(heads) and next(m.parameters(recurse=False), None) is not None]


def mark_trainable(transformer, cfg: TrainConfig) -> list[str]:
    """Add the LoRA adapter or unfreeze the full fine-tune patterns (never the :func:`discarded_modules`); return
    the trained parameter names."""
    transformer.requires_grad_(False)
    discarded = discarded_modules(transformer)
    if cfg.method == "lora":
        from peft import LoraConfig

        torch.manual_seed(cfg.seed)
        transformer.add_adapter(LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha,
                                           target_modules=list(cfg.lora.targets), exclude_modules=discarded,
                                           init_lora_weights=True))
    elif cfg.method == "full":
        skip = tuple(m + "." for m in discarded)
        for name, p in transformer.named_parameters():
            p.requires_grad_(not name.startswith(skip) and any(fnmatch.fnmatch(name, pat) for pat in cfg.trainable))
    else:
        raise ConfigError(f"method {cfg.method!r} is not 'lora' or 'full'")
    names = [n for n, p in transformer.named_parameters() if p.requires_grad]
    if not names:
        patterns = cfg.trainable if cfg.method == "full" else cfg.lora.targets
        raise ConfigError(f"nothing to train: the patterns {patterns} match no parameter of the transformer")
    return names


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.acc = make_accelerator(cfg)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.dataset = load_dataset(cfg.data)
        if not cfg.distill.enabled:
            require_targets(self.dataset)
        self.sampler = BucketSampler(self.dataset.samples, cfg.batch_size, self.world,
                                     parse_weights(cfg.task_weights), parse_weights(cfg.count_weights, int), cfg.seed,
                                     repeat=cfg.nft.inner_steps if cfg.nft.enabled else 1)
        store = open_embeddings(cfg, self.dataset.samples)
        if cfg.fsdp and cfg.dump_grads:
            raise ConfigError("dump_grads saves whole gradients, but FSDP holds shards: train with DDP to dump them")
        self.model = load_model(cfg.model, dtype="fp32", device=str(self.acc.device))
        self.scheduler_config = self.model.scheduler_config
        self.inputs = input_builder(cfg, self.model, self.acc.device, store)
        transformer = self.model.transformer
        merge_teacher_lora(transformer, cfg.distill)
        self.trainable = mark_trainable(transformer, cfg)
        if cfg.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        if cfg.low_vram.block_swap and (cfg.fsdp or self.world > 1):
            raise ConfigError("low_vram.block_swap streams one process's frozen blocks: train on one device (set "
                              "fsdp: false and start one process) or set low_vram.block_swap: false")
        self.low_vram = LowVram(cfg.low_vram, cfg.method)
        self.low_vram.before_prepare(transformer)
        self.objective = RowObjective(cfg, self.model, transformer, self.acc.device)
        transformer.train()
        self.params = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=cfg.lr, betas=tuple(cfg.betas),
                                           weight_decay=cfg.weight_decay)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(cfg.lr_schedule, self.optimizer, num_warmup_steps=cfg.warmup_steps,
                                          num_training_steps=cfg.steps)
        self.transformer, self.optimizer = self.acc.prepare(transformer, self.optimizer)
        check_kept_parameters(self.transformer, self.params)
        # made from the prepared tensors: under FSDP the average lives on this rank's shards, as they do
        self.ema = EMA(self.named_trainable(), cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.objective.after_prepare(self.acc, self.transformer)
        self.low_vram.after_prepare(self.module, self.acc.device)
        log.info("process %d of %d (%s): %s, %d trained tensors", self.rank, self.world, self.acc.distributed_type,
                 type(self.transformer).__name__, len(self.trainable))
        self.step = 0
        self.losses: dict[int, float] = {}
        self.stats: dict[str, float] = {}  # the last step's objective statistics (mean over processes)
        self.stat_history: dict[int, dict[str, float]] = {}  # step -> its statistics (stats.json)

    # -- parameters -------------------------------------------------------------------------------------------
    @property
    def module(self):
        return self.acc.unwrap_model(self.transformer)

    def named_trainable(self) -> dict[str, torch.Tensor]:
        """The trained tensors by their names in the bare transformer (FSDP's own names carry wrapper prefixes).
        They are the prepared model's parameters; under FSDP, between steps, each holds this rank's shard (flat)."""
        return self.params

    def trainable_state(self, whole: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The trained tensors, whole. With FSDP every process must call it; rank 0 gets them, the others ``{}``."""
        if self.cfg.fsdp:
            whole = self.acc.get_state_dict(self.transformer) if whole is None else whole
            return {n: whole[n] for n in self.trainable if n in whole}
        return {n: p.detach() for n, p in self.named_trainable().items()}

    # -- inputs -----------------------------------------------------------------------------------------------
    def row_inputs(self, sample, key, step: int, pos: int) -> RowInputs:
        return self.inputs.row_inputs(sample, key, step, pos)

    def row_loss(self, inputs: RowInputs, step: int, pos: int, sample=None) -> torch.Tensor:
        return self.row_objective(inputs, step, pos, sample)[0]

    def row_objective(self, inputs: RowInputs, step: int, pos: int, sample=None) -> tuple[torch.Tensor, dict]:
        """The row's loss and statistics at the row's drawn sigma and noise."""
        cfg = self.cfg
        x0 = inputs.x0
        sigma = sample_sigmas(cfg.timesteps, step, [pos], self.sampler.global_batch, x0.shape[1],
                              self.scheduler_config, cfg.seed).to(x0.device)
        noise = torch.randn(x0.shape, generator=row_generator(cfg.seed, step, pos, "noise")).to(x0.device)
        return self.objective.row_loss(self.transformer, sample, inputs, noise, sigma, step, pos)

    def evaluate(self, rows: int = 4, draws: int = 2) -> float:
        """Mean loss of the first ``rows`` rows at fixed noise levels and noise (comparable across training)."""
        return self.evaluate_objective(rows, draws)[0]

    @torch.no_grad()
    def evaluate_objective(self, rows: int = 4, draws: int = 2) -> tuple[float, dict[str, float]]:
        """:meth:`evaluate` with the objective's statistics (DPO margin and accuracy, identity distance)."""
        self.transformer.eval()
        total, n, stats = 0.0, 0, []
        for i, sample in enumerate(self.dataset.samples[:rows]):
            for d in range(draws):
                step = EVAL_STEP + d
                loss, row_stats = self.row_objective(self.row_inputs(sample, bucket_key(sample), step, i), step, i,
                                                     sample)
                total, n = total + float(loss), n + 1
                stats.append(row_stats)
        self.transformer.train()
        keys = self.objective.stat_keys
        return total / n, {k: float(v) for k, v in zip(keys, mean_stats(stats, keys))}

    # -- one step ---------------------------------------------------------------------------------------------
    def train_step(self) -> float:
        batch = self.sampler.next()
        step = batch.step
        rows = batch.for_rank(self.rank, self.world)
        positions = batch.global_positions(self.rank, self.world)
        self.optimizer.zero_grad(set_to_none=True)
        total, stats = 0.0, []
        for j, (idx, pos) in enumerate(zip(rows, positions)):
            sample = self.dataset.samples[idx]
            inputs = self.row_inputs(sample, batch.key, self.objective.input_step(step), pos)
            last = j == len(rows) - 1
            with contextlib.nullcontext() if last else self.acc.no_sync(self.transformer), \
                    self.low_vram.activations():
                loss, row_stats = self.row_objective(inputs, step, pos, sample)
                self.acc.backward(loss / len(rows))
            total += float(loss.detach())
            stats.append(row_stats)
        if self.cfg.dump_grads and step == 0:
            self.dump_grads(Path(self.cfg.dump_grads))
        if self.cfg.grad_clip and self.cfg.grad_clip > 0:
            self.acc.clip_grad_norm_(self.transformer.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.update(self.named_trainable())
        self.objective.after_step()
        mean = self.acc.reduce(torch.tensor(total / len(rows), device=self.acc.device), reduction="mean")
        self.step = step + 1
        self.losses[self.step] = float(mean)
        keys = self.objective.stat_keys
        if keys:
            every = self.acc.gather(mean_stats(stats, keys).to(self.acc.device)).reshape(-1, len(keys))
            self.stats = {k: float(v) for k, v in zip(keys, every.nanmean(0)) if not torch.isnan(v)}
            self.stat_history[self.step] = dict(self.stats)
        return float(mean)

    def dump_grads(self, path: Path) -> None:
        """Save (rank 0) the trained tensors' gradients as the optimizer will see them: all-reduced, unclipped."""
        from safetensors.torch import save_file

        grads = {n: p.grad.detach().cpu().contiguous() for n, p in self.named_trainable().items()
                 if p.grad is not None}
        if self.acc.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(grads, str(path))

    # -- checkpoints ------------------------------------------------------------------------------------------
    def optimizer_state(self) -> dict:
        if self.cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            # On CPU, torch 2.14's offload is no copy and the full state reuses one gather buffer: each parameter's
            # exp_avg comes back as the same tensor as its exp_avg_sq. Offload only from an accelerator.
            offload = self.acc.device.type != "cpu"
            return get_optimizer_state_dict(self.transformer, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=offload))
        return ckpt.optimizer_by_name(self.optimizer.state_dict(), self.trainable)

    def save(self) -> Path:
        trainable = self.trainable_state()
        opt = self.optimizer_state()
        ema = self.ema.state_dict(self.named_trainable(), self.transformer) if self.ema else None  # FSDP: a gather
        extra = self.objective.extra_state()  # under FSDP a gather: every process
        path = None
        if self.acc.is_main_process:
            state = {"step": self.step, "sampler": self.sampler.state_dict(),
                     "lr_scheduler": self.lr_scheduler.state_dict(), "losses": self.losses,
                     "stats": self.stat_history,
                     "config": to_dict(self.cfg)}
            path = ckpt.save_checkpoint(self.out / "checkpoints", self.step, trainable, opt, json.loads(
                json.dumps(state, default=str)), ema, self.cfg.keep_checkpoints, extra)
        self.acc.wait_for_everyone()
        return path or self.out / "checkpoints" / f"step-{self.step:08d}"

    def resume_path(self) -> Path | None:
        r = self.cfg.resume
        if r in (None, "", "none"):
            return None
        if r == "auto":
            return ckpt.latest_checkpoint(self.out / "checkpoints")
        return ckpt.checked_checkpoint(Path(r))

    def load(self, path: Path) -> None:
        data = ckpt.load_checkpoint(path)
        names = set(data["trainable"])
        if names != set(self.trainable):
            raise ckpt.CheckpointError(f"checkpoint {path} trains {len(names)} tensors, this run "
                                       f"{len(self.trainable)}: resume with the same method, LoRA targets and "
                                       "trainable patterns")
        optimizer = ckpt.optimizer_by_name(data["optimizer"], self.trainable)  # the same in every checkpoint
        if self.cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            load_full_state(self.transformer, data["trainable"])
            set_optimizer_state_dict(self.transformer, self.optimizer, optimizer,
                                     options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            with torch.no_grad():
                for n, p in self.named_trainable().items():
                    p.copy_(data["trainable"][n])
            self.optimizer.load_state_dict(optimizer)
        state = data["state"]
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        if self.ema is not None:
            if data["ema"] is None:
                raise ckpt.CheckpointError(f"checkpoint {path} has no EMA state but ema_decay is set")
            self.ema.load_state_dict(data["ema"], self.named_trainable(), self.transformer)
        self.objective.load_extra_state(data["extra"], str(path))
        ckpt.set_rng_state(data["rng"])
        self.step = int(state["step"])
        self.losses = {int(k): v for k, v in state["losses"].items()}
        self.stat_history = {int(k): v for k, v in state.get("stats", {}).items()}
        log.info("resumed from %s at step %d", path, self.step)

    # -- validation -------------------------------------------------------------------------------------------
    def validate(self) -> Path | None:
        """Edit the first validation rows with the current (EMA, if any) weights; rank 0 saves and logs the grid."""
        from ..pipeline import EditPipeline

        if not (self.cfg.fsdp or self.acc.is_main_process):
            self.acc.wait_for_everyone()
            return None
        self.model.set("transformer", self.transformer if self.cfg.fsdp else self.module)
        self.transformer.eval()
        weights = self.ema.applied(self.named_trainable(), self.transformer) if self.ema is not None \
            else contextlib.nullcontext()
        with weights, torch.no_grad():
            rows = validation_rows(EditPipeline(self.model), self.dataset.samples, self.cfg)
        self.transformer.train()
        path = None
        if self.acc.is_main_process:
            path = save_grid(image_grid(rows), self.out, self.step, self.acc.trackers)
        self.acc.wait_for_everyone()
        return path

    # -- the loop ---------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg = self.cfg
        resume = self.resume_path()
        if resume is not None:
            self.load(resume)
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
        if cfg.tracker not in (None, "none", ""):
            self.acc.init_trackers("firered", config={k: str(v) for k, v in to_dict(cfg).items()})
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.acc.is_local_main_process,
                   desc="train", dynamic_ncols=True)
        result = TrainResult()
        start, start_step = time.perf_counter(), self.step
        while self.step < cfg.steps:
            loss = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.lr_scheduler.get_last_lr()[0]:.2e}")
            if cfg.log_every and self.step % cfg.log_every == 0:
                self.acc.log({"loss": loss, "lr": self.lr_scheduler.get_last_lr()[0], **self.stats}, step=self.step)
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                result.checkpoint = self.save()
            if cfg.validation.every and self.step % cfg.validation.every == 0:
                self.validate()
        bar.close()
        elapsed = time.perf_counter() - start
        done = self.step - start_step
        result.samples_per_s = done * self.sampler.global_batch / elapsed if elapsed > 0 and done else 0.0
        if not cfg.checkpoint_every or self.step % cfg.checkpoint_every:
            result.checkpoint = self.save()
        result.exports = self.export()
        result.losses = dict(self.losses)
        if self.acc.is_main_process:
            (self.out / "losses.json").write_text(json.dumps(self.losses, indent=0))
            if self.stat_history:
                (self.out / "stats.json").write_text(json.dumps(self.stat_history, indent=0))
        self.acc.end_training()
        return result

    def export(self) -> dict[str, Path]:
        from .export import export_full, export_lora

        whole = self.acc.get_state_dict(self.transformer) if self.cfg.fsdp and self.cfg.method == "full" else None
        state = self.trainable_state(whole)
        ema = self.ema.whole(self.named_trainable(), self.transformer) if self.ema is not None else None
        out = {}
        meta = self.objective.export_metadata()
        if self.acc.is_main_process:
            if self.cfg.method == "lora":
                out.update(export_lora(state, self.out / "export", self.cfg.export_name, self.cfg.lora.alpha, meta))
                if ema is not None:
                    out.update({f"ema_{k}": v for k, v in export_lora(
                        ema, self.out / "export", self.cfg.export_name + "_ema", self.cfg.lora.alpha, meta).items()})
            else:
                out["full"] = export_full(self.module, state, self.cfg.model, self.out / "export" / "model", whole)
                if ema is not None:
                    out["ema_full"] = export_full(self.module, ema, self.cfg.model,
                                                  self.out / "export" / "model_ema", whole)
        self.acc.wait_for_everyone()
        return out


def check_kept_parameters(model: torch.nn.Module, params: dict[str, torch.Tensor]) -> None:
    """The trainer reaches the trained tensors through the parameter objects it made them from, which DDP and FSDP
    with ``use_orig_params`` keep (FSDP changes their data to the shard); a wrapper that replaced them would leave the
    EMA, validation and resume working on dead copies."""
    alive = {id(p) for p in model.parameters()}
    lost = [n for n, p in params.items() if id(p) not in alive]
    if lost:
        raise RuntimeError(f"the prepared model no longer holds {len(lost)} trained tensors (e.g. {lost[0]}): "
                           "FSDP must keep the original parameters (use_orig_params=True)")


def train(cfg: TrainConfig) -> TrainResult:
    return Trainer(cfg).run()

