"""Every speed and memory option, declared once.

Each :class:`Option` row is the whole of an option: its settings field (:class:`~firered_core.speed.ModelSettings`
or :class:`~firered_core.speed.RunSettings`, built from these rows), its CLI flag (:func:`add_arguments`), its
ComfyUI widget on FireRed Speed Settings (:func:`widget`, in the table's order: the node's saved workflows map values
by position, so a new option goes last with ``optional=True``), its range (checked by :func:`check` on the CLI and the
node, and by pydantic in the settings) and its row in ``docs/speed-and-memory.md`` (:func:`markdown_table`).
``tests/test_options.py`` fails when an option exists in one of those places and not in the others.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import Field

from . import doc_tables
from .block_cache import BlockCacheConfig
from .kernels.attention import ATTENTION_BACKENDS
from .limits import Limit, check as check_limits
from .memory import QUANT_MODES
from .quant.fp8_file import FP8_MODES

COMPILE_MODES = ("none", "blocks", "blocks-max-autotune", "blocks-cudagraphs")
_CACHE = BlockCacheConfig()
BEGIN = "<!-- speed-options:begin (generated: python -m firered_core.options --write) -->"
END = "<!-- speed-options:end -->"


@dataclass(frozen=True)
class Option:
    """One option. ``half``: ``model`` (applied when a component is prepared) or ``run`` (one edit). ``help`` is
    the CLI help and the docs row; ``tooltip`` the widget's; ``exact`` says whether the result changes."""

    name: str
    half: Literal["model", "run"]
    kind: type
    default: Any
    help: str
    tooltip: str
    exact: str
    choices: tuple[str, ...] = ()
    limit: Limit | None = None
    optional: bool = False  # node: added after the first release (optional input, after the others)
    node_default: Any = None  # the widget's default when it differs from the setting's
    step: float | None = None
    nullable: bool = False  # str | None: "" on the widget means None

    @property
    def flag(self) -> str:
        off = self.kind is bool and self.default is True
        return ("--no-" if off else "--") + self.name.replace("_", "-")

    def annotation(self):
        base = Literal[self.choices] if self.choices else self.kind  # type: ignore[valid-type]
        return base | None if self.nullable else base

    def field(self) -> tuple[Any, Any]:
        """``(type, Field)`` of the settings field (range and finiteness from :attr:`limit`)."""
        bounds = {"ge": self.limit.lo, "le": self.limit.hi} if self.limit else {}
        if self.kind is float:
            bounds["allow_inf_nan"] = False
        return self.annotation(), Field(self.default, **bounds)

    def values(self) -> str:
        """The values it takes, as the docs say them."""
        if self.choices:
            return ", ".join(self.choices)
        if self.limit:
            return f"{self.limit.lo:g}..{self.limit.hi:g}"
        return {bool: "on / off", str: "a folder" if self.nullable else "text"}.get(self.kind, self.kind.__name__)


OPTIONS: tuple[Option, ...] = (
    Option("batched_cfg", "run", bool, False,
           "run both CFG branches in one forward",
           "Sampler: run the instruction and negative passes of true CFG in one batched forward (same result, faster "
           "on a GPU; falls back to two passes when memory is short).",
           "yes (1e-5)"),
    Option("cache_threshold", "run", float, 0.0,
           "block cache: skip middle blocks when the first blocks' residual changes less than this (relative L1; "
           "0 = off, ~0.05-0.15 typical)",
           "Block cache: skip the middle blocks when the first blocks' residual changes less than this (relative "
           "L1). 0 = never skip; ~0.05-0.15 typical; higher = faster, less exact.",
           "no (PSNR printed)", limit=Limit(float, 0.0, 10.0, "block cache threshold (0 = off)"),
           node_default=_CACHE.threshold, step=0.005),
    Option("cache_first", "run", int, _CACHE.first, "block cache: blocks always computed first",
           "Block cache: blocks always computed first (their change is the probe).", "-",
           limit=Limit(int, 1, 200, "blocks the block cache always computes first")),
    Option("cache_last", "run", int, _CACHE.last, "block cache: blocks always computed last",
           "Block cache: blocks always computed last.", "-",
           limit=Limit(int, 0, 200, "blocks the block cache always computes last")),
    Option("cache_warmup", "run", int, _CACHE.warmup, "block cache: steps always fully computed",
           "Block cache: first steps always computed in full.", "-",
           limit=Limit(int, 0, 1000, "steps the block cache always computes fully")),
    Option("cache_max_consecutive", "run", int, _CACHE.max_consecutive, "block cache: most cached steps in a row",
           "Block cache: most cached steps in a row before a full step.", "-",
           limit=Limit(int, 0, 1000, "most cached steps in a row")),
    Option("taylorseer", "run", bool, _CACHE.taylorseer, "block cache: extrapolate the cached residual",
           "Block cache: extrapolate the cached residual to first order (TaylorSeer) instead of reusing it as is.",
           "no"),
    Option("quantize", "model", str, "none",
           "transformer quantisation: int8 / fp8 weight-only, or int8_mm / fp8_mm with int8 / fp8 matmuls (dynamic "
           "per-token activation scales) where the GPU has them; fp8_mm is faster than bf16 only when compiled",
           "Loader: quantisation of the transformer (half the weight memory of bf16; output projections stay full "
           "precision). int8 / fp8: weight-only; int8_mm / fp8_mm: int8 / fp8 matmuls on GPUs that have them "
           "(fp8_mm needs RTX 40xx / H100 or newer and is fastest only with compile: without it, slower than "
           "bf16). Lossy.",
           "no (52 dB on an H200)", choices=QUANT_MODES),
    Option("quantize_text_encoder", "model", str, "none", "text encoder weight-only quantisation",
           "Loader: weight-only quantisation of the Qwen2.5-VL text encoder (vision tower kept).",
           "no", choices=QUANT_MODES),
    Option("compile", "model", str, "none",
           "torch.compile the transformer blocks (default mode, max-autotune without CUDA graphs, or with CUDA "
           "graphs)",
           "Loader: torch.compile the repeated transformer blocks (first run slower; not with block swap).",
           "yes within fp32 tolerance", choices=COMPILE_MODES),
    Option("block_swap", "model", int, 0,
           "keep N transformer blocks on the device and stream the rest (0 = off)",
           "Loader: keep this many transformer blocks on the GPU and stream the rest from system RAM (0 = off). For "
           "small GPUs.",
           "yes", limit=Limit(int, 0, 200, "transformer blocks kept on the device (0 = off)")),
    Option("vae_tiling", "model", bool, False, "decode / encode large images in tiles",
           "Loader: decode / encode large images in tiles (less VRAM).", "no (only above one tile)"),
    Option("embed_cache", "model", bool, True, "encode the prompt even if the same one was encoded before",
           "Loader: never encode the same (prompt, references) twice in this ComfyUI session (lossless).", "yes"),
    Option("embed_cache_dir", "model", str, None, "also keep prompt embeddings in this folder",
           "Loader: also keep prompt embeddings in this folder across sessions (empty = memory only).", "yes",
           nullable=True),
    Option("fp8_mode", "model", str, "load",
           "an fp8 transformer file (ComfyUI fp8_scaled or e4m3): runtime keeps its weights in fp8 and runs fp8 "
           "matmuls (GPUs with compute capability >= 8.9; elsewhere each layer is dequantised per call, same result "
           "as load, half the memory); load dequantises them to --dtype at load (default)",
           "Single-File Loader, fp8 transformer file only (ComfyUI fp8_scaled or fp8_e4m3fn): runtime keeps its "
           "weights in fp8 (half the memory of bf16) and runs fp8 matmuls on RTX 40xx / H100 and newer (lossy: "
           "activations in fp8); other devices dequantise each layer when it runs (same pixels as load). load: "
           "convert to the compute dtype when loading. No LoRA on a runtime fp8 transformer.",
           "fallback yes; fp8 matmul no", choices=FP8_MODES, optional=True),
    Option("attention", "model", str, "sdpa",
           "joint attention kernel: torch's choice, a preferred SDPA kernel, SageAttention, or auto",
           "Loader: the attention kernel. sdpa = torch's choice; flash / cudnn / efficient = that SDPA kernel first "
           "(others after it where it cannot run); auto = cuDNN on H100 and newer, flash on other GPUs, torch's "
           "choice on a CPU; sage = SageAttention (needs the sageattention package; lossy, CUDA only, SDPA "
           "elsewhere). All but sage give the same image within rounding.",
           "SDPA kernels within bf16 rounding; sage no", choices=ATTENTION_BACKENDS, optional=True),
)
BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
LIMITS: dict[str, Limit] = {o.name: o.limit for o in OPTIONS if o.limit is not None}


def names(half: str | None = None) -> tuple[str, ...]:
    return tuple(o.name for o in OPTIONS if half in (None, o.half))


def fields(half: str) -> dict[str, tuple[Any, Any]]:
    """The settings fields of ``half`` (``model`` / ``run``) for ``pydantic.create_model``."""
    return {o.name: o.field() for o in OPTIONS if o.half == half}


def check(values: dict[str, Any], spell: Callable[[str], str] = lambda name: name) -> dict[str, Any]:
    """The numeric options among ``values`` against their ranges (``spell`` names the option in the error)."""
    return check_limits({k: v for k, v in values.items() if k in LIMITS}, spell=spell, table=LIMITS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One CLI flag per option (``--batched-cfg``, ``--cache-threshold`` ...) in a "speed and memory" group."""
    group = parser.add_argument_group("speed and memory")
    for o in OPTIONS:
        if o.kind is bool:
            group.add_argument(o.flag, dest=o.name, action="store_false" if o.default else "store_true", help=o.help)
        else:
            extra = {"choices": o.choices} if o.choices else {"type": o.kind}
            metavar = {"block_swap": "N", "cache_threshold": "T", "embed_cache_dir": "DIR"}.get(o.name)
            group.add_argument(o.flag, dest=o.name, default=o.default, metavar=metavar, help=o.help, **extra)


def widget(option: Option) -> tuple:
    """The ComfyUI input of ``option``: ``(type or choices, {default, min, max, step, tooltip})``."""
    default = option.default if option.node_default is None else option.node_default
    spec: dict = {"default": "" if default is None and option.nullable else default}
    if option.limit is not None:
        spec.update(min=option.kind(option.limit.lo), max=option.kind(option.limit.hi))
    if option.step is not None:
        spec["step"] = option.step
    spec["tooltip"] = option.tooltip
    if option.choices:
        return list(option.choices), spec
    return {bool: "BOOLEAN", int: "INT", float: "FLOAT", str: "STRING"}[option.kind], spec


def markdown_table() -> str:
    """The option table of ``docs/speed-and-memory.md``."""
    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|")

    rows = ["| option | CLI flag | node widget | values | default | what it does | exact? |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    def shown(value: Any) -> str:
        if isinstance(value, bool) or value is None:
            return {True: "on", False: "off", None: "none"}[value]
        return f"{value:g}" if isinstance(value, float) else str(value)

    for o in OPTIONS:
        rows.append(f"| `{o.name}` ({o.half}) | `{o.flag}` | *{o.name}*{' (optional)' if o.optional else ''} | "
                    f"{cell(o.values())} | {cell(shown(o.default))} | {cell(o.help)} | {cell(o.exact)} |")
    return "\n".join(rows)


def replace_between_markers(text: str, table: str) -> str:
    """``text`` with what lies between :data:`BEGIN` and :data:`END` replaced by ``table``."""
    return doc_tables.replace_between_markers(text, table, BEGIN, END)


def main(argv: list[str] | None = None) -> None:
    doc_tables.main("speed-and-memory.md", markdown_table(), BEGIN, END, argv)


if __name__ == "__main__":
    main()
