"""Memory savers: weight-only quantisation, block swap and VAE tiling.

- Quantisation stores each Linear weight as int8 or fp8 (e4m3) with one scale per output channel and dequantises
  it to the activation dtype at every call: half the weight memory of bf16, the matmul itself unchanged. Output
  projections (``proj_out``, ``lm_head``), the input embeddings and the vision tower stay in full precision.
- ``int8_mm`` / ``fp8_mm`` store the same weights but also quantise the activations per token at call time and run the
  matmul itself in int8 / fp8 where the device has the kernel (``firered_core.quant``); elsewhere they dequantise.
- Block swap keeps the first ``resident`` transformer blocks on the device and streams the others from (pinned) CPU
  memory, one block ahead on a side CUDA stream, so only ``resident + 2`` blocks occupy the device at once.
- VAE tiling is diffusers' own (``enable_tiling``); it only changes images larger than one tile.
"""

from __future__ import annotations

import fnmatch
import weakref

import torch

from .quant.weight import QuantLinear  # noqa: F401  (re-exported: memory is where quantisation is applied)

QUANT_MODES = ("none", "int8", "fp8", "int8_mm", "fp8_mm")
KEEP_TRANSFORMER = ("proj_out", "img_in", "txt_in", "norm_out.*", "time_text_embed.*")
KEEP_TEXT_ENCODER = ("lm_head", "*visual*", "model.visual*")
_swapped: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def _kept(name: str, keep: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, pat) for pat in keep)


def quantize_linears(module: torch.nn.Module, mode: str, keep: tuple[str, ...] = ()) -> int:
    """Replace every ``nn.Linear`` not matching a ``keep`` pattern (dotted names) in place; returns the count.

    Layers are replaced one by one, so the peak memory is the model plus one full-precision layer.
    """
    if mode == "none":
        return 0
    layer_class = QuantLinear
    if mode.endswith("_mm"):
        from .quant import FastQuantLinear

        layer_class, mode = FastQuantLinear, mode[: -len("_mm")]
    count = 0
    for name, child in list(module.named_modules()):
        for child_name, sub in list(child.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(sub) is torch.nn.Linear and not _kept(full, keep):
                setattr(child, child_name, layer_class(sub, mode))
                count += 1
    return count


def quantize_transformer(transformer: torch.nn.Module, mode: str) -> int:
    return quantize_linears(transformer, mode, KEEP_TRANSFORMER)


def quantize_text_encoder(text_encoder: torch.nn.Module, mode: str) -> int:
    return quantize_linears(text_encoder, mode, KEEP_TEXT_ENCODER)


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters and buffers (what a component costs on the device)."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


class BlockSwap:
    """Keep ``resident`` blocks on ``device``; stream the others in before they run and drop them after.

    Each streamed block keeps a CPU copy of its tensors (pinned when the device is CUDA); running it swaps the
    ``.data`` of its parameters to a device copy made on a side stream one block ahead. Weights never change at
    inference, so dropping a block is just pointing back at the CPU copy. On a CPU device the same bookkeeping runs
    with plain copies, which keeps the path testable without a GPU.

    ``frozen_only`` (training) streams only tensors without gradients: trained ones (a LoRA) stay on the device, so
    the optimizer's updates are never pointed away from. With activation checkpointing, backward re-runs each block's
    forward, so the hooks stream the frozen weights in again for its gradients.
    """

    def __init__(self, transformer: torch.nn.Module, resident: int, device: torch.device | str,
                 frozen_only: bool = False):
        self.device = torch.device(device)
        self.blocks = list(transformer.transformer_blocks)
        self.resident = max(0, min(resident, len(self.blocks)))
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        for name, child in transformer.named_children():
            if name != "transformer_blocks":
                child.to(self.device)
        self.host: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.pending: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        for i, block in enumerate(self.blocks):
            if i < self.resident:
                block.to(self.device)
                continue
            block.to("cpu")
            tensors = [p for p in block.parameters() if not (frozen_only and p.requires_grad)] + list(block.buffers())
            self.host[i] = [(t, t.data.pin_memory() if self.cuda else t.data) for t in tensors]
            for t, cpu in self.host[i]:
                t.data = cpu
            for p in block.parameters():
                if frozen_only and p.requires_grad:
                    p.data = p.data.to(self.device)
        self.handles = []
        for i in self.host:
            self.handles.append(self.blocks[i].register_forward_pre_hook(self._before(i)))
            self.handles.append(self.blocks[i].register_forward_hook(self._after(i)))
        _swapped.add(transformer)
        self.transformer = transformer

    def _copy(self, i: int) -> None:
        if i in self.pending or i not in self.host:
            return
        if self.cuda:
            with torch.cuda.stream(self.stream):
                copies = [cpu.to(self.device, non_blocking=True) for _, cpu in self.host[i]]
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            copies, event = [cpu.clone() for _, cpu in self.host[i]], None
        self.pending[i] = (copies, event)

    def _next_streamed(self, i: int) -> int | None:
        later = [j for j in self.host if j > i] or [j for j in self.host if j < i]
        return min(later) if later else None

    def _before(self, i: int):
        def hook(module, args):
            self._copy(i)
            copies, event = self.pending.pop(i)
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
            for (t, _), dev in zip(self.host[i], copies):
                if self.cuda:
                    dev.record_stream(torch.cuda.current_stream(self.device))
                t.data = dev
            nxt = self._next_streamed(i)
            if nxt is not None:
                self._copy(nxt)
        return hook

    def _after(self, i: int):
        def hook(module, args, output):
            for t, cpu in self.host[i]:
                t.data = cpu
        return hook

    def remove(self) -> None:
        """Unhook; streamed blocks stay on the CPU."""
        for h in self.handles:
            h.remove()
        self.pending.clear()
        _swapped.discard(self.transformer)


def is_block_swapped(module: torch.nn.Module) -> bool:
    """True while a :class:`BlockSwap` places ``module``'s weights itself (it must never be moved as a whole)."""
    return module in _swapped


def enable_vae_tiling(vae, enabled: bool = True) -> None:
    if enabled:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
