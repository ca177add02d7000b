"""``QwenImageTransformer2DModel.forward`` rebuilt from its submodules, with the block loop exposed.

The block cache (``block_cache.py``) needs to run the first blocks, decide, then run or skip the middle ones; diffusers'
forward has no such seam. :func:`run_transformer` is the same computation in the same order (so with the plain loop
it equals ``transformer(...)`` bit for bit) and takes a ``block_loop`` that owns the iteration over
``transformer_blocks``. ControlNet residuals and guidance embeddings are not part of this family's edit model.
"""

from __future__ import annotations

from math import prod
from typing import Callable, Protocol

import torch

# (block, hidden_states, encoder_hidden_states) -> (encoder_hidden_states, hidden_states), as the block returns.
BlockCall = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class BlockLoop(Protocol):
    def __call__(self, blocks: torch.nn.ModuleList, hidden: torch.Tensor, encoder: torch.Tensor,
                 call: BlockCall) -> tuple[torch.Tensor, torch.Tensor]: ...


def plain_loop(blocks: torch.nn.ModuleList, hidden: torch.Tensor, encoder: torch.Tensor, call: BlockCall
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every block in order: the reference behaviour."""
    for block in blocks:
        encoder, hidden = call(block, hidden, encoder)
    return encoder, hidden


def modulate_index(img_shapes: list, device) -> torch.Tensor:
    """Per image token: 0 for the output image, 1 for reference tokens (``zero_cond_t`` models)."""
    return torch.tensor([[0] * prod(sample[0]) + [1] * sum(prod(s) for s in sample[1:]) for sample in img_shapes],
                        device=device, dtype=torch.int)


def run_transformer(transformer, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    encoder_hidden_states_mask: torch.Tensor | None, timestep: torch.Tensor, img_shapes: list,
                    attention_kwargs: dict | None = None, block_loop: BlockLoop = plain_loop) -> torch.Tensor:
    """The transformer's output [B, L, 64] for packed tokens ``hidden_states`` (noisy + reference)."""
    from diffusers.models.transformers.transformer_qwenimage import compute_text_seq_len_from_mask

    if transformer.config.guidance_embeds or getattr(transformer.config, "use_additional_t_cond", False):
        raise NotImplementedError("guidance / additional_t_cond embeddings are not used by the edit model")
    attention_kwargs = dict(attention_kwargs or {})
    attention_kwargs.pop("scale", None)
    zero_cond_t = transformer.zero_cond_t

    hidden_states = transformer.img_in(hidden_states)
    timestep = timestep.to(hidden_states.dtype)
    index = None
    if zero_cond_t:
        timestep = torch.cat([timestep, timestep * 0], dim=0)
        index = modulate_index(img_shapes, timestep.device)
    encoder_hidden_states = transformer.txt_in(transformer.txt_norm(encoder_hidden_states))
    text_seq_len, _, mask = compute_text_seq_len_from_mask(encoder_hidden_states, encoder_hidden_states_mask)
    temb = transformer.time_text_embed(timestep, hidden_states, None)
    rotary = transformer.pos_embed(img_shapes, max_txt_seq_len=text_seq_len, device=hidden_states.device)

    def call(block, hidden, encoder):
        return block(hidden_states=hidden, encoder_hidden_states=encoder, encoder_hidden_states_mask=mask,
                     temb=temb, image_rotary_emb=rotary, joint_attention_kwargs=attention_kwargs,
                     modulate_index=index)

    _, hidden_states = block_loop(transformer.transformer_blocks, hidden_states, encoder_hidden_states, call)
    if zero_cond_t:
        temb = temb.chunk(2, dim=0)[0]
    return transformer.proj_out(transformer.norm_out(hidden_states, temb))
