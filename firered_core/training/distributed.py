"""Distributed set-up: accelerate's Accelerator for DDP or FSDP, the switch that gives CPU processes FSDP, and what
the objectives need to work on FSDP's shards (a frozen copy sharded as the trained model, whole tensors for
checkpoints, a fresh gather after writing into the shards)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .config import TrainConfig

BLOCK_CLASS = "QwenImageTransformerBlock"


def make_accelerator(cfg: TrainConfig):
    """DDP (unused-parameter detection on) or FSDP wrapping each ``QwenImageTransformerBlock``, as ``cfg.fsdp``."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    if not torch.distributed.is_initialized():
        AcceleratorState._reset_state()
    kwargs = {}
    plugin = None
    if cfg.fsdp:
        from accelerate import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(
            auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=[BLOCK_CLASS],
            use_orig_params=True, state_dict_type="FULL_STATE_DICT")
        kwargs["fsdp_plugin"] = plugin
    else:
        # The last block's text-stream output (attn.to_add_out, txt_mlp) never reaches the prediction, so those
        # trained tensors get no gradient. Without unused-parameter detection DDP never finds the buckets holding
        # them ready: they are not all-reduced (each rank steps with its own gradients) and the next forward fails
        # with "Expected to have finished reduction in the prior iteration".
        kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    tracker = cfg.tracker if cfg.tracker not in (None, "none", "") else None
    # Without an accelerator, torchrun-style env (WORLD_SIZE > 1) only becomes a gloo process group with cpu=True.
    acc = Accelerator(mixed_precision=cfg.mixed_precision, log_with=tracker, project_dir=cfg.output_dir,
                      cpu=not torch.cuda.is_available(), **kwargs)
    if plugin is not None:
        enable_cpu_fsdp(acc, plugin)
    return acc


def enable_cpu_fsdp(acc, plugin) -> None:
    """Give several CPU processes (gloo) the FSDP that accelerate gives several GPUs.

    accelerate 1.15 switches to FSDP only for multi-accelerator launches: on CPU it keeps ``MULTI_CPU``, silently drops
    the plugin and wraps the model in DDP (without unused-parameter detection, so the 2nd step fails with "Expected to
    have finished reduction"). torch's FSDP itself runs on CPU with gloo, so the state is switched to FSDP as
    accelerate does for GPUs; from there ``prepare``, ``no_sync``, ``clip_grad_norm_`` and ``get_state_dict`` take
    accelerate's own FSDP path (``FullyShardedDataParallel`` with ``device_id=acc.device``), the one a GPU run takes.
    The device becomes plain ``cpu``: accelerate's multi-CPU ``cpu:0`` fails FSDP's check against the current CPU
    device ("Inconsistent compute device and `device_id` on rank 0: cpu vs cpu:0"); both name the same memory.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if acc.distributed_type != DistributedType.MULTI_CPU:
        return
    if acc.state.mixed_precision != "no":
        plugin.set_mixed_precision(acc.state.mixed_precision)
    acc.state.fsdp_plugin = plugin
    # Both shared states, as accelerate writes FSDP for GPUs: every later AcceleratorState() re-reads PartialState's.
    for state in (PartialState(), acc.state):
        state.distributed_type = DistributedType.FSDP
        state.device = torch.device("cpu")


def is_fsdp(model: torch.nn.Module | None) -> bool:
    if model is None:
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return isinstance(model, FSDP)


def shard_frozen(acc, module: torch.nn.Module) -> torch.nn.Module:
    """``module`` (frozen) wrapped by FSDP as the trained transformer is, so each rank holds a shard of it; unchanged
    without FSDP (DDP has nothing to synchronise for a model that is not trained)."""
    from accelerate.utils import DistributedType

    if acc.distributed_type != DistributedType.FSDP:
        return module
    return acc.prepare_model(module)


def regather(model: torch.nn.Module | None) -> None:
    """Make FSDP's next forward all-gather the shards as they are now, after something wrote into them in place.

    After a forward FSDP frees every unit's gathered parameters except the root's (kept for the backward, which a
    no-grad forward never runs); the next forward then reuses the root's stale gathered copy instead of gathering.
    Freeing it here is what FSDP's own post-backward does. No-op without FSDP. Uses FSDP1's internals (the unit's
    ``_handle``, ``_runtime_utils._reshard``) as torch 2.14 has them: FSDP1 has no public call for this.
    """
    if not is_fsdp(model):
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp._runtime_utils import _reshard

    for unit in FSDP.fsdp_modules(model):
        handle = unit._handle
        gathered = handle is not None and hasattr(handle.flat_param, "_full_param_padded")  # after FSDP's lazy init
        if gathered and handle.uses_sharded_strategy and not handle.needs_unshard():
            _reshard(unit, handle, True)


def full_state(model: torch.nn.Module, names) -> dict[str, torch.Tensor]:
    """The whole tensors ``names`` of an FSDP model, gathered from every rank's shard (a collective: every rank calls
    it); rank 0 gets them, the other ranks ``{}``."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    regather(model)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT,
                              FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
        whole = model.state_dict()
    return {n: whole[n] for n in names if n in whole}


def load_full_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Write whole tensors (the same on every rank) into an FSDP model's shards (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    regather(model)  # the load writes the gathered copy back into the shards: it must be the shards' own
    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))
