"""Which kernel runs the joint (text + image) attention of every transformer block.

``sdpa`` is torch's own choice (today's behaviour). ``flash`` / ``cudnn`` / ``efficient`` put that SDPA kernel first
(``torch.nn.attention.sdpa_kernel`` with priority, the others after it, so a padding mask that the first cannot take
still runs). ``sage`` is SageAttention (INT8 Q·K, the optional ``sage`` extra; lossy: benchmarks/gpu.py measures its
error) for mask-free calls on CUDA, SDPA otherwise. ``auto`` is cuDNN on Hopper and newer, flash elsewhere on CUDA,
SDPA on a CPU (the fastest measured on an H200 with torch 2.11; docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTENTION_BACKENDS = ("sdpa", "flash", "cudnn", "efficient", "sage", "auto")
_ORDER = {
    "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                  SDPBackend.MATH],
}
SDPA_KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def check_backend(name: str) -> str:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention={name!r} is not one of {ATTENTION_BACKENDS}")
    return name


SAGE_MISSING = ("attention='sage' needs the sageattention package, which is not installed: pip install "
                "'comfyui-firered-edit[sage]' (or sageattention), or choose another attention kernel (auto picks the "
                "fastest SDPA kernel)")


def sage_installed() -> bool:
    return importlib.util.find_spec("sageattention") is not None


def resolve(name: str, device: torch.device | str) -> str:
    """``auto`` -> a concrete backend for ``device``; ``sage`` without the package is an error naming the extra."""
    device = torch.device(device)
    check_backend(name)
    if name == "sage" and not sage_installed():
        raise ValueError(SAGE_MISSING)
    if name != "auto":
        return name
    if device.type != "cuda":
        return "sdpa"
    return "cudnn" if torch.cuda.get_device_capability(device) >= (9, 0) else "flash"


def _sage_ready() -> None:
    """diffusers' ``sage`` backend imports ``sageattn`` only for SageAttention >= 2.1.1 (a CUDA build); 1.x (Triton,
    on PyPI) has the same call, so it is handed over when diffusers skipped the import."""
    from diffusers.models import attention_dispatch

    if getattr(attention_dispatch, "sageattn", None) is None:
        from sageattention import sageattn

        attention_dispatch.sageattn = sageattn


_CLASSES: dict[tuple[type, str], type] = {}


def _wrap_processor(processor, backend: str):
    """An instance of a subclass of ``processor``'s class whose ``__call__`` runs under the chosen kernel.

    One subclass per (class, backend), shared by every block: a compiled block guards on the processor's type, so
    one class per block would recompile the shared graph for each block.
    """
    base = type(processor)
    inner = getattr(base, "_firered_base", base)
    cls = _CLASSES.get((inner, backend))
    if cls is None:
        cls = _CLASSES[(inner, backend)] = _make_class(inner, backend)
    wrapped = cls.__new__(cls)
    wrapped.__dict__.update(processor.__dict__)
    return wrapped


def _make_class(inner: type, backend: str) -> type:
    from diffusers.models.attention_dispatch import AttentionBackendName

    @functools.wraps(inner.__call__)
    def call(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
             attention_mask=None, **kwargs):
        args = (attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, attention_mask)
        if backend == "sage":
            sage = hidden_states.is_cuda and encoder_hidden_states_mask is None and attention_mask is None
            self._attention_backend = AttentionBackendName.SAGE if sage else None
            return inner.__call__(self, *args, **kwargs)
        with sdpa_kernel(_ORDER[backend], set_priority=True):
            return inner.__call__(self, *args, **kwargs)

    return type(f"{inner.__name__}_{backend}", (inner,), {"__call__": call, "_firered_base": inner,
                                                          "_firered_backend": backend})


def set_attention_backend(transformer: torch.nn.Module, name: str, device: torch.device | str | None = None) -> str:
    """Route every joint attention of ``transformer`` through backend ``name``; returns the backend chosen.

    Idempotent and reversible (``sdpa`` restores the model's own processors). LoRA wrappers and regional compile are
    unaffected: only the attention processors change.
    """
    if device is None:
        device = next(transformer.parameters()).device
    chosen = resolve(name, device)
    if chosen == "sage":
        _sage_ready()
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is None or not hasattr(processor, "_attention_backend"):
            continue
        base = getattr(type(processor), "_firered_base", type(processor))
        if chosen == "sdpa":
            restored = base.__new__(base)
            restored.__dict__.update(processor.__dict__)
            restored._attention_backend = None
            module.processor = restored
        else:
            module.processor = _wrap_processor(processor, chosen)
    return chosen


def attention_backend_of(transformer: torch.nn.Module) -> str:
    """The backend the transformer's first attention runs (``sdpa`` when untouched)."""
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            return getattr(type(processor), "_firered_backend", "sdpa")
    return "sdpa"
