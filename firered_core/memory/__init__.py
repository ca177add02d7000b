"""Memory savers: weight-only quantisation, block swap and VAE tiling.

- Quantisation stores each Linear weight as int8 or fp8 (e4m3) with one scale per output channel and dequantises
  it to the activation dtype at every call: half the weight memory of bf16, the matmul itself unchanged. Output
  projections (``proj_out``, ``lm_head``), the input embeddings and the vision tower stay in full precision.
- ``int8_mm`` / ``fp8_mm`` store the same weights but also quantise the activations per token at call time and run the
  matmul itself in int8 / fp8 where the device has the kernel (``firered_core.quant``); elsewhere they dequantise.
- Block swap keeps the first ``resident`` blocks of a ModuleList (the transformer's blocks, a text encoder's decoder
  layers) on the device and streams the others from (pinned) CPU memory, one block ahead on a side CUDA stream, so
  only ``resident + 2`` blocks occupy the device at once; :meth:`BlockSwap.remove` undoes it.
- :class:`OnDevice` runs a component where it rests (the CPU) for callers holding tensors on the device.
- :class:`TiledOnOOM` retries a VAE's decode / encode tiled when the device runs out of memory.
- VAE tiling is diffusers' own (``enable_tiling``); it only changes images larger than one tile.

What to do when a component does not fit the device (swap, stream, tile or run where it rests) is FireRed's fallback
policy, in :mod:`.managed`, behind any host memory manager (ComfyUI's, or the plain stand-in there).
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import weakref

import torch

from ..quant.weight import QuantLinear  # noqa: F401  (re-exported: memory is where quantisation is applied)

QUANT_MODES = ("none", "int8", "fp8", "int8_mm", "fp8_mm")
KEEP_TRANSFORMER = ("proj_out", "img_in", "txt_in", "norm_out.*", "time_text_embed.*")
KEEP_TEXT_ENCODER = ("lm_head", "*visual*", "model.visual*")
_swapped: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
log = logging.getLogger(__name__)


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
        from ..quant import FastQuantLinear

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

    ``blocks`` is the ModuleList streamed (default ``module.transformer_blocks``; a text encoder's decoder layers are
    :func:`text_encoder_layers`); every other weight of ``module`` (embeddings, a vision tower, heads) is moved to
    ``device``. Each streamed block keeps a CPU copy of its tensors (pinned when the device is CUDA); running it swaps
    the ``.data`` of its parameters to a device copy made on a side stream one block ahead. Weights never change at
    inference, so dropping a block is just pointing back at the CPU copy. On a device other than CUDA (the CPU, the
    memory estimate's stand-in) the same bookkeeping runs with plain copies, which keeps the path testable without
    a GPU.

    ``frozen_only`` (training) streams only tensors without gradients: trained ones (a LoRA) stay on the device, so
    the optimizer's updates are never pointed away from. With activation checkpointing, backward re-runs each block's
    forward, so the hooks stream the frozen weights in again for its gradients. There the block's frozen tensors are
    replaced by device tensors for the run and put back after it, rather than re-pointed through ``.data``: autograd
    may save a frozen parameter itself (an RMSNorm weight in a product), and re-pointing it at the CPU copy after
    the recompute would hand backward a CPU tensor (a checkpoint metadata error on a GPU).
    """

    def __init__(self, module: torch.nn.Module, resident: int, device: torch.device | str,
                 frozen_only: bool = False, blocks: torch.nn.ModuleList | None = None):
        self.device = torch.device(device)
        self.blocks = list(module.transformer_blocks if blocks is None else blocks)
        self.resident = max(0, min(resident, len(self.blocks)))
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        for t in _tensors_outside(module, self.blocks):
            t.data = t.data.to(self.device)
        self.frozen_only = frozen_only
        self.host: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.slots: dict[int, list[tuple[dict, str]]] = {}  # frozen_only: where each streamed tensor is registered
        self.pending: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        for i, block in enumerate(self.blocks):
            if i < self.resident:
                block.to(self.device)
                continue
            block.to("cpu")
            named = [(n, p) for n, p in block.named_parameters() if not (frozen_only and p.requires_grad)]
            named += list(block.named_buffers())
            self.host[i] = [(t, t.data.pin_memory() if self.cuda else t.data) for _, t in named]
            self.slots[i] = [_slot(block, n) for n, _ in named]
            for t, cpu in self.host[i]:
                t.data = cpu
            for p in block.parameters():
                if frozen_only and p.requires_grad:
                    p.data = p.data.to(self.device)
        self.handles = []
        for i in self.host:
            self.handles.append(self.blocks[i].register_forward_pre_hook(self._before(i)))
            self.handles.append(self.blocks[i].register_forward_hook(self._after(i)))
        _swapped.add(module)
        self.module = module

    def _copy(self, i: int) -> None:
        if i in self.pending or i not in self.host:
            return
        if self.cuda:
            with torch.cuda.stream(self.stream):
                copies = [cpu.to(self.device, non_blocking=True) for _, cpu in self.host[i]]
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            copies, event = [cpu.to(self.device, copy=True) for _, cpu in self.host[i]], None
        self.pending[i] = (copies, event)

    def _next_streamed(self, i: int) -> int | None:
        """The streamed block expected to run after block ``i`` (the one copied ahead). In a forward: the next one
        up; after the last, the first again (inference's next call) or, when training, block ``i`` itself (backward
        re-runs the last block first). In backward, where checkpointing re-runs the blocks last to first: the next
        one down, and none after the first (prefetching up there would hold every block by the end of backward)."""
        if torch._C._current_graph_task_id() >= 0:
            lower = [j for j in self.host if j < i]
            return max(lower) if lower else None
        later = [j for j in self.host if j > i]
        if later:
            return min(later)
        if self.frozen_only:
            return i
        earlier = [j for j in self.host if j < i]
        return min(earlier) if earlier else None

    def _before(self, i: int):
        def hook(module, args):
            self._copy(i)
            copies, event = self.pending.pop(i)
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
            for k, ((t, _), dev) in enumerate(zip(self.host[i], copies)):
                if self.cuda:
                    dev.record_stream(torch.cuda.current_stream(self.device))
                if self.frozen_only:
                    table, name = self.slots[i][k]
                    table[name] = torch.nn.Parameter(dev, False) if isinstance(t, torch.nn.Parameter) else dev
                else:
                    t.data = dev
            nxt = self._next_streamed(i)
            if nxt is not None:
                self._copy(nxt)
        return hook

    def _after(self, i: int):
        def hook(module, args, output):
            self._put_back(i)
        return hook

    def _put_back(self, i: int) -> None:
        if self.frozen_only:
            for (t, _), (table, name) in zip(self.host[i], self.slots[i]):
                table[name] = t
            return
        for t, cpu in self.host[i]:
            t.data = cpu

    def remove(self, to: torch.device | str | None = None) -> None:
        """Unhook and point every streamed tensor back at its CPU copy (also after a run that failed mid-way);
        with ``to``, move the whole module there (where it was before), in unpinned memory when it is the CPU."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.pending.clear()
        unpin = self.cuda and to is not None and torch.device(to).type == "cpu"
        for i, tensors in self.host.items():
            self._put_back(i)
            for t, cpu in tensors:
                t.data = torch.empty_like(cpu).copy_(cpu) if unpin else cpu
        self.host.clear()
        self.slots.clear()
        _swapped.discard(self.module)
        if to is not None:
            self.module.to(to)


def _slot(block: torch.nn.Module, name: str) -> tuple[dict, str]:
    """The table (a module's ``_parameters`` or ``_buffers``) and key that hold the tensor ``block`` calls ``name``."""
    prefix, _, leaf = name.rpartition(".")
    owner = block.get_submodule(prefix)
    return (owner._parameters if leaf in owner._parameters else owner._buffers), leaf


def _tensors_outside(module: torch.nn.Module, blocks: list[torch.nn.Module]) -> list[torch.Tensor]:
    """Parameters and buffers of ``module`` that belong to none of ``blocks`` (each once, tied weights included)."""
    inside = {id(t) for b in blocks for t in list(b.parameters()) + list(b.buffers())}
    seen: dict[int, torch.Tensor] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in inside:
            seen.setdefault(id(t), t)
    return list(seen.values())


def text_encoder_layers(text_encoder: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The decoder layers of a Qwen2.5-VL text encoder (what :class:`BlockSwap` streams; the vision tower, the
    embeddings and the head stay whole), or None for a module without them."""
    for path in ("model.language_model.layers", "language_model.layers", "model.layers"):
        module = text_encoder
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, torch.nn.ModuleList):
            return module
    return None


def fit_resident(total: int, block_sizes: list[int], room: int) -> int | None:
    """How many leading blocks may stay resident under :class:`BlockSwap` in ``room`` bytes, counting the rest of
    the module (``total`` minus the blocks) and the two streamed blocks in flight; None when not even streaming
    every block fits."""
    rest = total - sum(block_sizes)
    for resident in range(len(block_sizes), -1, -1):
        streamed = block_sizes[resident:]
        in_flight = sum(sorted(streamed, reverse=True)[:2])
        if rest + sum(block_sizes[:resident]) + in_flight <= room:
            return resident
    return None


def move_tensors(obj, device: torch.device):
    """``obj`` with every tensor in it on ``device``: tensors, tuples, lists, dicts and model outputs (copied), and
    plain result objects such as a VAE's latent distribution (a shallow copy with its tensor attributes moved)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(move_tensors(o, device) for o in obj)
    if isinstance(obj, dict):
        out = copy.copy(obj)
        for key in list(obj.keys()):
            out[key] = move_tensors(obj[key], device)
        return out
    if hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)) and any(
            isinstance(v, torch.Tensor) for v in vars(obj).values()):
        out = copy.copy(obj)
        for key, value in vars(obj).items():
            if isinstance(value, torch.Tensor):
                setattr(out, key, value.to(device))
        return out
    return obj


class ComponentView:
    """A component seen through a wrapper that changes how some of its methods run (:attr:`WRAPPED`); every other
    attribute (``dtype``, ``config``, ``parameters``) is the component's own. Nothing is attached to the component,
    so dropping the view undoes it; :attr:`module` is the component."""

    WRAPPED: tuple[str, ...] = ()

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def _wrap(self, fn):
        return fn

    def __call__(self, *args, **kwargs):
        return self._wrap(self.module)(*args, **kwargs)

    def __getattr__(self, name: str):
        value = getattr(self.module, name)
        return self._wrap(value) if name in self.WRAPPED else value


def unwrapped(module) -> torch.nn.Module:
    """The component behind a :class:`ComponentView` (a module is its own)."""
    return module.module if isinstance(module, ComponentView) else module


class OnDevice(ComponentView):
    """``module`` run where it rests (``run_device``, e.g. the CPU) by callers that hand it tensors on ``io_device``:
    every call (the module itself, or ``encode`` / ``decode``) gets its tensor arguments moved to ``run_device`` and
    its tensor results moved back."""

    WRAPPED = ("encode", "decode", "forward")

    def __init__(self, module: torch.nn.Module, run_device: torch.device, io_device: torch.device):
        super().__init__(module)
        self.run_device, self.io_device = torch.device(run_device), torch.device(io_device)

    def _wrap(self, fn):
        def call(*args, **kwargs):
            args, kwargs = move_tensors(args, self.run_device), move_tensors(kwargs, self.run_device)
            return move_tensors(fn(*args, **kwargs), self.io_device)
        return call


def is_block_swapped(module: torch.nn.Module) -> bool:
    """True while a :class:`BlockSwap` places ``module``'s weights itself (it must never be moved as a whole)."""
    return module in _swapped


class TiledOnOOM(ComponentView):
    """A VAE whose ``encode`` / ``decode`` run again tiled when the device runs out of memory (as ComfyUI's own VAE
    does), after a log line; the VAE's tiling setting is put back after the retry. Untiled when memory suffices, so
    its pixels are the plain run's."""

    WRAPPED = ("encode", "decode")

    def _wrap(self, fn):
        vae = self.module

        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except torch.OutOfMemoryError:
                if getattr(vae, "use_tiling", True):
                    raise
            # outside the except block: its traceback holds the failed run's tensors
            log.warning("FireRed: the VAE ran out of memory on %s; retrying it in tiles", vae.device)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            enable_vae_tiling(vae, True)
            try:
                return fn(*args, **kwargs)
            finally:
                enable_vae_tiling(vae, False)
        return call


def enable_vae_tiling(vae, enabled: bool = True) -> None:
    if enabled:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
