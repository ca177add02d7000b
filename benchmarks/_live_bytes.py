"""Live tensor bytes per device, counted at the dispatcher, and a fake accelerator to count them on without memory.

:class:`LiveBytes` is a ``TorchDispatchMode``: every tensor an op returns has its storage counted once (views and
in-place results share the storage, so they add nothing) until the storage is freed (a weak reference's callback
subtracts it). It counts what the program holds, the quantity ``torch.cuda.memory_allocated`` reports; CUDA's caching
allocator rounds each block up to 512 bytes (``round_to``) and reserves more than it hands out (fragmentation, cuBLAS
and attention workspaces), which no dispatcher sees.

:func:`fake_accelerator` runs code on fake tensors (``FakeTensorMode``: shapes, dtypes and devices, no data) with the
``meta`` device standing in for the GPU. Fake *cuda* tensors can be made on a CPU-only torch and run forward, but the
autograd engine asks the CUDA runtime about device 0 in backward, so a fake cuda backward fails; ``meta`` runs both.
What differs from a GPU is put right: ``scaled_dot_product_attention`` is routed to the fused flash kernel (a GPU
picks a fused kernel, flash / memory-efficient / cuDNN, for bf16 without a mask, each saving O(tokens) for backward;
elsewhere torch falls back to the math path, which keeps the whole attention matrix in float32); fake parameters can
be moved between the stand-in and the CPU and re-pointed with ``.data`` as real ones between a GPU and the CPU; Adam
reads its step counter, a value a fake tensor does not hold, as the first step's. Streams, events and pinning (block
swap's CUDA path, ``save_on_cpu``'s pinned buffers) are not exercised: they change timing, not the bytes held.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import weakref
from collections import defaultdict
from functools import partial

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_DEVICE = torch.ops.prim.device.default
STAND_IN = "meta"  # the device type that stands in for the GPU under fake_accelerator
CUDA_BLOCK = 512  # CUDA's caching allocator hands out multiples of 512 bytes


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storage per device type (``current``) and their maximum since :meth:`reset_peak`
    (``peak``). Only tensors made while the mode is active are seen: enter it before building the model."""

    def __init__(self, round_to: dict[str, int] | None = None):
        super().__init__()
        self.round_to = round_to or {}
        self.live: dict[int, tuple[str, int, weakref.ref]] = {}
        self.current: dict[str, int] = defaultdict(int)
        self.peak: dict[str, int] = defaultdict(int)

    def size(self, device: str, nbytes: int) -> int:
        block = self.round_to.get(device, 1)
        return math.ceil(nbytes / block) * block

    def add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key, device = id(st), t.device.type
        nbytes = self.size(device, st.nbytes())
        if key in self.live:
            old_device, old, ref = self.live[key]
            if old == nbytes:
                return
            self.current[old_device] -= old  # resized in place
        else:
            ref = weakref.ref(st, partial(self._free, key))
        self.live[key] = (device, nbytes, ref)
        self.current[device] += nbytes
        self.peak[device] = max(self.peak[device], self.current[device])

    def _free(self, key: int, _ref) -> None:
        device, nbytes, _ = self.live.pop(key)
        self.current[device] -= nbytes

    def reset_peak(self) -> None:
        """Start a new peak at the current bytes (as ``torch.cuda.reset_peak_memory_stats``)."""
        self.peak = defaultdict(int, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _DEVICE and _is_fake(args[0]):  # metadata asked for at most C++ calls: nothing to count
            return torch.device("meta") if args[0].fake_mode.in_kernel_invocation else args[0].fake_device
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    """``scaled_dot_product_attention`` through the fused flash kernel (what saves O(tokens) for backward, as a GPU's
    flash / memory-efficient / cuDNN kernels do): the CPU flash kernel on CPU tensors, the CUDA one elsewhere."""
    if attn_mask is not None or enable_gqa:
        raise NotImplementedError("the memory estimate routes attention without a mask only (flash attention)")
    if query.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                          scale=scale)[0]
    return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                              scale=scale)[0]


@contextlib.contextmanager
def fused_attention_everywhere():
    """``torch.nn.functional.scaled_dot_product_attention`` is :func:`fused_attention` inside the context."""
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = fused_attention
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def _first_step(step) -> float:
    """Adam's step counter as a number; a fake tensor holds no value, and the estimate runs the first step."""
    from torch._subclasses.fake_tensor import FakeTensor

    return 1.0 if isinstance(step, FakeTensor) else _REAL_GET_VALUE(step)


ADAM = importlib.import_module("torch.optim.adam")
_REAL_GET_VALUE = ADAM._get_value
_TENSOR_DATA = torch._C.TensorBase.data


def _set_data(tensor, new) -> None:
    """``tensor.data = new`` that also moves a fake tensor's device (``set_data`` copies the storage, not the
    Python-side ``fake_device``)."""
    _TENSOR_DATA.__set__(tensor, new)
    tensor.fake_device = new.fake_device


@contextlib.contextmanager
def fake_accelerator():
    """Fake tensors everywhere, ``meta`` as the GPU (see the module's notes for what is adjusted).

    Fake ``meta`` tensors get the CPU's backend dispatch keys: ``tensor.data = other`` (how block swap points a
    parameter at its device copy and back) refuses to mix meta and dense tensors, as it refuses nothing between a
    GPU and the CPU; fake mode keeps each tensor's reported device, so ops still refuse to mix devices."""
    import torch._dynamo  # noqa: F401  (loads its checks of Tensor methods before _make_subclass is wrapped)
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    make_subclass = torch.Tensor._make_subclass

    def cpu_keys(cls, data, requires_grad=False, **kwargs):
        device = kwargs.get("device_for_backend_keys")
        if cls is FakeTensor and device is not None and torch.device(device).type == STAND_IN:
            kwargs["device_for_backend_keys"] = torch.device("cpu")
        return make_subclass(cls, data, requires_grad, **kwargs)

    mode = FakeTensorMode()
    swap_tensors = torch.utils.swap_tensors

    def swap_unmemoized(t1, t2):
        # fake mode's memo of the tensors it made holds a weak reference to each, and swap_tensors (how modules
        # convert fake parameters) refuses a tensor with one; the memo is only a cache
        mode.fake_tensor_converter.tensor_memo.clear()
        swap_tensors(t1, t2)

    torch.utils.swap_tensors = swap_unmemoized
    torch.Tensor._make_subclass = cpu_keys
    FakeTensor.data = property(_TENSOR_DATA.__get__, _set_data)
    ADAM._get_value = _first_step
    try:
        with mode, fused_attention_everywhere():
            yield
    finally:
        ADAM._get_value = _REAL_GET_VALUE
        del FakeTensor.data
        torch.Tensor._make_subclass = make_subclass
        torch.utils.swap_tensors = swap_tensors
