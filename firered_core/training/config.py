"""Training configuration: one dataclass tree read from YAML or TOML, with ``key.sub=value`` CLI overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..geometry import VAE_AREA, VL_AREA
from .alignment import AlignmentConfig, VariantConfig
from .identity import IdentityConfig
from .lowvram import LowVramConfig
from .preference import PreferenceConfig
from .timesteps import TimestepConfig

# Attention, MLP and modulation linears of every block (FireRed's LoRA recipe).
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1", "txt_mod.1"]


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


@dataclass
class ValidationConfig:
    every: int = 0  # steps; 0 = off
    rows: int = 2
    steps: int = 8
    true_cfg: float = 1.0
    seed: int = 0


@dataclass
class TrainConfig:
    model: str = ""
    data: str | list = ""
    output_dir: str = "runs/firered"
    embeddings: str | None = None  # an extraction folder; None encodes online with the text encoder
    prompt_mode: str = "pipeline"
    method: str = "lora"  # "lora" | "full"
    lora: LoraConfig = field(default_factory=LoraConfig)
    trainable: list[str] = field(default_factory=lambda: ["transformer_blocks.*"])  # full fine-tune patterns
    steps: int = 1000
    batch_size: int = 1  # per process
    lr: float = 1e-4
    weight_decay: float = 0.03
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    lr_schedule: str = "constant_with_warmup"
    grad_clip: float = 1.0
    seed: int = 0
    target_area: float = VAE_AREA
    reference_area: float = VAE_AREA
    vl_area: float = VL_AREA
    task_weights: str | dict | None = None
    count_weights: str | dict | None = None
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    loss_weighting: str = "none"
    outlier: float | None = 50.0
    variants: VariantConfig = field(default_factory=VariantConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    ema_decay: float = 0.0  # 0 = no EMA
    gradient_checkpointing: bool = False
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)  # Diffusion-DPO on rejected_image pairs
    identity: IdentityConfig = field(default_factory=IdentityConfig)  # face identity loss on x0_hat
    low_vram: LowVramConfig = field(default_factory=LowVramConfig)  # fp8 base, block swap, activation offload
    mixed_precision: str = "no"  # "no" | "bf16"
    fsdp: bool = False  # wrap QwenImageTransformerBlock with FSDP (else DDP when several processes)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: str | None = "auto"  # "auto" (latest in output_dir if any), a checkpoint path, or None
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    log_every: int = 1
    tracker: str | None = "tensorboard"
    export_name: str = "firered_lora"
    stop_after: int | None = None  # tests: die right after this step, as a killed job would
    dump_grads: str | None = None  # debug: save step 1 gradients here (rank 0, all-reduced, unclipped; not FSDP)


def _build(cls, data: dict, where: str = ""):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(where + k for k in unknown)}; known: {sorted(names)}")
    kwargs = {}
    for k, v in data.items():
        default = names[k].default_factory() if names[k].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default) and isinstance(v, dict):
            v = _build(type(default), v, f"{where}{k}.")
        kwargs[k] = v
    return cls(**kwargs)


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        import tomllib

        return tomllib.loads(text)
    return yaml.safe_load(text) or {}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **values) -> TrainConfig:
    """Config file (YAML / TOML), then ``key.sub=value`` overrides (values parsed as YAML), then keyword values."""
    tree = read_config_file(path) if path else {}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        _set(tree, key.strip(), yaml.safe_load(raw))
    for key, value in values.items():
        _set(tree, key, value)
    return _build(TrainConfig, tree)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
