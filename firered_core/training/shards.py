"""What the objectives need to work on FSDP's shards: a frozen copy sharded as the trained model, whole tensors for
checkpoints, and a fresh gather after something wrote into the shards in place. No config imports here: :mod:`.ema`
(and through it the objectives' configs) uses it."""

from __future__ import annotations

import torch


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
