"""Training configuration: one dataclass tree read from YAML or TOML, with ``key.sub=value`` CLI overrides.

Every key is typed (with its range) and checked by pydantic when the config is loaded: an unknown key or a value of
the wrong type is one :class:`ConfigError` line naming the key, the value and what is expected. YAML is read with
the 1.2 core schema (``1e-4`` is a number, ``no`` is a string) and overrides are read by their field's type.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, TypeAdapter, ValidationError, with_config

from ..errors import ConfigError
from ..geometry import VAE_AREA, VL_AREA
from ..limits import CONFIG, Count, NonNegative, Positive, PositiveInt, Probability, annotated
from .alignment import AlignmentConfig, VariantConfig
from .distill import DistillConfig
from .identity import IdentityConfig
from .losses import WEIGHTINGS
from .lowvram import LowVramConfig
from .nft import NFTConfig
from .preference import PreferenceConfig
from .timesteps import TimestepConfig

LR_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                "piecewise_constant")  # diffusers.optimization.SchedulerType
Steps, TrueCfg, Seed = annotated("steps", strict=False), annotated("true_cfg"), annotated("seed", strict=False)
VaeArea, VlArea = annotated("vae_area"), annotated("vl_area")

# Attention, MLP and modulation linears of every block (FireRed's LoRA recipe).
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1", "txt_mod.1"]


@with_config(CONFIG)
@dataclass
class LoraConfig:
    rank: PositiveInt = 16
    alpha: Positive = 16.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


@with_config(CONFIG)
@dataclass
class ValidationConfig:
    every: Count = 0  # steps; 0 = off
    rows: PositiveInt = 2
    steps: Steps = 8
    true_cfg: TrueCfg = 1.0
    seed: Seed = 0


@with_config(CONFIG)
@dataclass
class TrainConfig:
    model: str = ""
    data: str | list[str] = ""
    output_dir: str = "runs/firered"
    embeddings: str | None = None  # an extraction folder; None encodes online with the text encoder
    prompt_mode: Literal["pipeline", "chat"] = "pipeline"
    method: Literal["lora", "full"] = "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)
    trainable: list[str] = field(default_factory=lambda: ["transformer_blocks.*"])  # full fine-tune patterns
    steps: PositiveInt = 1000
    batch_size: PositiveInt = 1  # per process
    lr: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-4
    weight_decay: NonNegative = 0.03
    betas: tuple[Probability, Probability] = (0.9, 0.999)
    warmup_steps: Count = 100
    lr_schedule: Literal[LR_SCHEDULES] = "constant_with_warmup"
    grad_clip: NonNegative = 1.0  # 0 = no clipping
    seed: Seed = 0
    target_area: VaeArea = VAE_AREA
    reference_area: VaeArea = VAE_AREA
    vl_area: VlArea = VL_AREA
    task_weights: str | dict[str, float] | None = None
    count_weights: str | dict[int, float] | None = None
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    loss_weighting: Literal[WEIGHTINGS] = "none"
    outlier: Positive | None = 50.0
    variants: VariantConfig = field(default_factory=VariantConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0  # 0 = no EMA
    gradient_checkpointing: bool = False
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)  # Diffusion-DPO on rejected_image pairs
    identity: IdentityConfig = field(default_factory=IdentityConfig)  # face identity loss on x0_hat
    low_vram: LowVramConfig = field(default_factory=LowVramConfig)  # fp8 base, block swap, activation offload
    nft: NFTConfig = field(default_factory=NFTConfig)  # online RL (DiffusionNFT) from the model's own edits
    distill: DistillConfig = field(default_factory=DistillConfig)  # few-step CFG-free LoRA from the CFG teacher
    mixed_precision: Literal["no", "bf16"] = "no"
    fsdp: bool = False  # wrap QwenImageTransformerBlock with FSDP (else DDP when several processes)
    checkpoint_every: Count = 500
    keep_checkpoints: Count = 2  # 0 = keep all
    resume: str | None = "auto"  # "auto" (latest in output_dir if any), a checkpoint path, or None
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    log_every: PositiveInt = 1
    tracker: str | None = "tensorboard"
    export_name: Annotated[str, Field(min_length=1)] = "firered_lora"
    dump_grads: str | None = None  # debug: save step 1 gradients here (rank 0, all-reduced, unclipped; not FSDP)


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = tree.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {dotted!r}: {p!r} is {node!r}, not a section with keys")
        tree = node
    tree[leaf] = value


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with the 1.2 core schema's scalars: only true/false are booleans (``no`` stays a string) and ``1e-4``
    is a number."""


_Yaml12Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))
_FLOAT = r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(f"^(?:{_FLOAT})$"), list("-+0123456789."))


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        if path.suffix == ".toml":
            import tomllib

            tree = tomllib.loads(text)
        else:
            tree = parse_yaml(text)
    except (yaml.YAMLError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"config file {path} is not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: "
                          f"{reason}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} holds a {type(tree).__name__}, not a mapping of keys to values")
    return tree


def _field_type(dotted: str):
    """The annotation of the (nested) TrainConfig field ``dotted``, or None for an unknown key."""
    cls, hint = TrainConfig, None
    for part in dotted.split("."):
        if cls is None or not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls, include_extras=True)
        if part not in hints:
            return None
        hint = hints[part]
        cls = hint if isinstance(hint, type) else None
    return hint


def _scalar(hint) -> bool:
    """True when every alternative of ``hint`` is a plain scalar (a string, a number, a bool, a literal or None)."""
    if typing.get_origin(hint) is Annotated:
        return _scalar(typing.get_args(hint)[0])
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return all(_scalar(a) for a in typing.get_args(hint))
    return typing.get_origin(hint) is Literal or hint in (str, int, float, bool, type(None))


def _accepts_none(hint) -> bool:
    if typing.get_origin(hint) is Annotated:
        return _accepts_none(typing.get_args(hint)[0])
    return hint is type(None) or any(a is type(None) for a in typing.get_args(hint))


def parse_override(item: str) -> tuple[str, object]:
    """``key.sub=value`` -> (key, value) read by the field's type: a scalar field gets the text as written (pydantic
    converts it: ``lr=5e-5`` is a number, ``mixed_precision=no`` stays "no"), ``null`` clears an optional field,
    lists / tuples / mappings are read as YAML (``lora.targets=[to_q, to_k]``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value")
    key, raw = (part.strip() for part in item.split("=", 1))
    hint = _field_type(key)
    if hint is None:
        return key, raw  # unknown: validation names it
    if raw in ("null", "~", "None", "none") and _accepts_none(hint) and not _literal_value(hint, raw):
        return key, None
    if _scalar(hint):
        return key, raw
    try:
        return key, parse_yaml(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({' '.join(str(exc).split())})") from None


def _literal_value(hint, raw: str) -> bool:
    """True when ``raw`` is one of the literal strings ``hint`` allows (``shift=none`` means the literal)."""
    if typing.get_origin(hint) is Annotated:
        return _literal_value(typing.get_args(hint)[0], raw)
    if typing.get_origin(hint) is Literal:
        return raw in typing.get_args(hint)
    return any(_literal_value(a, raw) for a in typing.get_args(hint))


def _describe(hint) -> str:
    """A type annotation in words: ``an integer >= 1``, ``one of 'no', 'bf16'``, ``a list of strings``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        limits = []
        for meta in args[1:]:
            for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "of length >=")):
                for item in [meta, *getattr(meta, "metadata", [])]:
                    value = getattr(item, attr, None)
                    if value is None:
                        continue
                    text = f"{sign} {value}" if isinstance(value, int) else f"{sign} {value:g}"
                    if text not in limits:
                        limits.append(text)
        return " ".join([_describe(args[0]), " and ".join(limits)]).strip()
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join(_describe(a) for a in args if a is not Ellipsis)
        return {list: "a list of ", tuple: "a tuple of ", dict: "a mapping of "}[origin] + f"({inner})"
    if dataclasses.is_dataclass(hint):
        return "a section of keys (" + ", ".join(f.name for f in dataclasses.fields(hint)) + ")"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            type(None): "null"}.get(hint, getattr(hint, "__name__", str(hint)))


def _key(loc: tuple) -> str:
    """The dotted config key of a pydantic error location (list indices and union branch tags left out)."""
    cls, parts = TrainConfig, []
    for item in loc:
        names = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if isinstance(item, str) and names:  # a field, or an unknown key of this section
            parts.append(item)
            cls = typing.get_type_hints(cls, include_extras=True).get(item) if item in names else None
            cls = cls if isinstance(cls, type) else None
    return ".".join(parts)


def _explain(exc: ValidationError) -> str:
    """Pydantic's errors as one line: each key at fault with its value and the expected type."""
    parts: dict[str, str] = {}
    for err in exc.errors():
        key = _key(err["loc"]) or "(top level)"
        if key in parts:
            continue
        if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            parent = key.rpartition(".")[0]
            section = _field_type(parent) if parent else TrainConfig
            known = ", ".join(f.name for f in dataclasses.fields(section))
            parts[key] = (f"unknown config key {key!r} (value {err['input']!r}); known keys"
                          f"{' of ' + repr(parent) if parent else ''}: {known}")
        else:
            hint = _field_type(key)
            parts[key] = f"config key {key!r}: value {err['input']!r} is not {_describe(hint) if hint else err['msg']}"
    return "; ".join(parts.values())


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **values) -> TrainConfig:
    """Config file (YAML / TOML), then ``key.sub=value`` overrides (read by each key's type), then keyword values;
    every key is checked against its field's type and range (:class:`ConfigError`, one line, on failure)."""
    tree = read_config_file(path) if path else {}
    for item in overrides or []:
        _set(tree, *parse_override(item))
    for key, value in values.items():
        _set(tree, key, value)
    try:
        return _ADAPTER.validate_python(tree)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None


_ADAPTER = TypeAdapter(TrainConfig)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
