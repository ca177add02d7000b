"""Low-VRAM LoRA training (24 GB cards): three switches on the frozen base, each independent.

- ``fp8_base``: every frozen ``nn.Linear`` (the LoRA's base layers) stores its weight as fp8 e4m3 with one scale per
  output channel (:class:`Fp8BaseLinear`, a :class:`firered_core.quant.weight.QuantLinear`) and computes in bf16; LoRA
  factors stay float32.
- ``block_swap``: all but ``resident_blocks`` transformer blocks keep their frozen tensors in (pinned) CPU memory and
  are streamed in before each block runs, in forward and again in backward (activation checkpointing is switched on
  with it, so backward re-runs each block's forward and its hooks). Trained tensors stay on the device.
- ``checkpointing`` with ``offload_activations``: per-block activation checkpointing; the tensors autograd still
  saves (block inputs) go to CPU memory (``torch.autograd.graph.save_on_cpu``) until backward needs them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from pydantic import with_config

from ..errors import ConfigError
from ..memory import BlockSwap
from ..quant.weight import QuantLinear
from ..limits import CONFIG, Count


@with_config(CONFIG)
@dataclass
class LowVramConfig:
    fp8_base: bool = False
    block_swap: bool = False
    resident_blocks: Count = 0  # with block_swap: blocks that stay on the device
    checkpointing: bool = False
    offload_activations: bool = False
    compute_dtype: Literal["bf16", "fp32"] = "bf16"  # matmul dtype of the fp8 base layers

    @property
    def any(self) -> bool:
        return self.fp8_base or self.block_swap or self.checkpointing or self.offload_activations


class Fp8BaseLinear(QuantLinear):
    """A frozen Linear stored as fp8 e4m3 (per-output-channel scale) that multiplies in ``compute_dtype``."""

    def __init__(self, linear: torch.nn.Linear, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__(linear, "fp8")
        self.matmul_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.matmul_dtype
        w = self.qweight.to(dtype) * self.scale.to(dtype)
        return F.linear(x.to(dtype), w, None if self.bias is None else self.bias.to(dtype)).to(x.dtype)


def store_frozen_fp8(module: torch.nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every frozen ``nn.Linear`` under ``module`` by an fp8-e4m3 :class:`QuantLinear`; returns the count."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and not child.weight.requires_grad:
                setattr(parent, name, Fp8BaseLinear(child, compute_dtype))
                count += 1
    return count


class LowVram:
    """Applies the configured switches to a transformer whose trained tensors are already marked."""

    def __init__(self, cfg: LowVramConfig, method: str):
        if cfg.fp8_base and method != "lora":
            raise ConfigError("low_vram.fp8_base stores the frozen base in fp8, which only a LoRA run leaves frozen: "
                             "set method: lora or low_vram.fp8_base: false")
        self.cfg = cfg
        self.swap: BlockSwap | None = None

    def before_prepare(self, transformer: torch.nn.Module) -> None:
        """fp8 storage and checkpointing (before the optimizer and the distributed wrapper see the model)."""
        if self.cfg.fp8_base:
            dtype = torch.bfloat16 if self.cfg.compute_dtype == "bf16" else torch.float32
            store_frozen_fp8(transformer.transformer_blocks, dtype)
        if self.cfg.checkpointing or self.cfg.block_swap:
            transformer.enable_gradient_checkpointing()

    def after_prepare(self, module: torch.nn.Module, device: torch.device) -> None:
        """Block swap on the unwrapped transformer (after placement, which would move every block)."""
        if self.cfg.block_swap:
            self.swap = BlockSwap(module, self.cfg.resident_blocks, device, frozen_only=True)

    @contextlib.contextmanager
    def activations(self):
        """The context for a forward + backward: activations saved on CPU when asked; with block swap, backward
        re-runs each block's forward to its end (no early stop), so the hook that drops its weights runs."""
        with contextlib.ExitStack() as stack:
            if self.cfg.offload_activations:
                stack.enter_context(torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()))
            if self.cfg.block_swap:
                stack.enter_context(torch.utils.checkpoint.set_checkpoint_early_stop(False))
            yield
