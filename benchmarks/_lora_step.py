"""The low-VRAM LoRA training step both low-VRAM benchmarks measure: its variants (the switches), its sizes and the
step itself. :mod:`benchmarks.lowvram_training` times it in real processes, :mod:`benchmarks.lowvram_estimate` counts
it on fake tensors; both import it from here, so neither imports the other's module at import time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

VARIANTS = {
    "plain": {},
    "checkpointing": {"checkpointing": True},
    "activation offload": {"offload_activations": True},
    "checkpointing + offload": {"checkpointing": True, "offload_activations": True},
    "fp8 base": {"fp8_base": True},
    "fp8 base + checkpointing": {"fp8_base": True, "checkpointing": True},
    "fp8 base + checkpointing + offload": {"fp8_base": True, "checkpointing": True, "offload_activations": True},
    "block swap": {"block_swap": True},
    "all": {"fp8_base": True, "block_swap": True, "offload_activations": True},
    "all, 20 blocks resident": {"fp8_base": True, "block_swap": True, "offload_activations": True,
                                "resident_blocks": 20},
}



@dataclass(frozen=True)
class StepShape:
    """The training step's sizes: the transformer (``layers`` x ``heads`` x 128) and one edit row at ``size``² (its
    target and ``references`` reference images of the same size, an instruction of ``text_tokens`` tokens)."""

    layers: int = 4
    heads: int = 8
    size: int = 512
    text_dim: int = 3584
    text_tokens: int = 256
    references: int = 1
    rank: int = 16


def prepare_lora_step(shape: StepShape, switches: dict, device: torch.device, base_dtype: torch.dtype,
                      init: bool = True) -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
    """The transformer with a LoRA (rank ``shape.rank``, FireRed's targets, float32) on a frozen ``base_dtype`` base,
    the low-VRAM ``switches`` applied as the trainer applies them, and the step: forward + backward of the flow
    matching loss on one edit row (target tokens, then the reference's, ``img_shapes`` as the trainer builds them),
    then an AdamW step on the LoRA. Returns ``(transformer, step)``; ``step()`` returns the loss. ``init=False``
    leaves every value unset (fake tensors)."""
    from peft import LoraConfig

    from benchmarks._common import full_size_transformer
    from firered_core import latents as L
    from firered_core.conditioning import PromptEmbeds
    from firered_core.references import RefLatents
    from firered_core.sampling import noised_start, transformer_denoiser
    from firered_core.training.config import LORA_TARGETS
    from firered_core.training.losses import weighted_flow_loss
    from firered_core.training.lowvram import LowVram, LowVramConfig

    build_on = torch.device("cpu") if switches.get("block_swap") else device
    tr = full_size_transformer(shape.layers, shape.heads, shape.text_dim, 0, build_on, base_dtype, init=init)
    torch.manual_seed(0)
    tr.add_adapter(LoraConfig(r=shape.rank, lora_alpha=shape.rank, target_modules=LORA_TARGETS,
                              init_lora_weights=init))
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()
            if "lora_B" in n and init:
                p.normal_(0, 0.01)
    low = LowVram(LowVramConfig(**switches), "lora")
    low.before_prepare(tr)
    optimizer = torch.optim.AdamW([p for p in tr.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    low.after_prepare(tr, device)
    tr.train()
    tokens = (shape.size // 16) ** 2
    grid = L.token_grid(shape.size, shape.size)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, tokens, 64, generator=g).to(device)
    noise = torch.randn(1, tokens, 64, generator=g).to(device)
    ref = RefLatents(torch.randn(1, tokens * shape.references, 64, generator=g).to(device, base_dtype),
                     [grid] * shape.references)
    cond = PromptEmbeds(torch.randn(1, shape.text_tokens, shape.text_dim, generator=g).to(device, base_dtype), None)
    sigma = torch.full((1,), 0.5, device=device)
    img_shapes = [[grid, *ref.shapes]]

    def step() -> torch.Tensor:
        with low.activations():
            xt = noised_start(x0, noise, sigma).to(base_dtype)
            pred = transformer_denoiser(tr, ref, img_shapes)(xt, sigma, cond, "cond")
            loss = weighted_flow_loss(pred, noise, x0, sigma)[0]
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return tr, step
