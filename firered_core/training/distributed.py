"""Distributed set-up: accelerate's Accelerator for DDP or FSDP, and the switch that gives CPU processes FSDP.
What the objectives need on FSDP's shards is in :mod:`.shards`."""

from __future__ import annotations

import torch

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
