"""Training-step throughput of the full-size FireRed transformer (60 blocks, 24 x 128) on one GPU, random weights.

    python -m benchmarks.training_gpu --size 1024 --refs 1 --method lora --steps 5

Measures forward + backward + AdamW step of the transformer alone (text embeddings and latents random, as with
cached extraction), bf16 weights, gradient checkpointing; prints samples/s and peak memory. Needs ~45 GB for LoRA.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from peft import LoraConfig

    from benchmarks._common import full_size_transformer
    from firered_core.training.config import LORA_TARGETS
    from firered_core.sampling import noised_start
    from firered_core.training.losses import flow_matching_loss

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--refs", type=int, default=1)
    p.add_argument("--text-len", type=int, default=256)
    p.add_argument("--method", default="lora", choices=("lora", "full"))
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--layers", type=int, default=60)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    dev = torch.device("cuda")
    model = full_size_transformer(a.layers, 24, 3584, 0, dev, torch.bfloat16)
    model.train()
    model.enable_gradient_checkpointing()
    model.requires_grad_(a.method == "full")
    if a.method == "lora":
        model.add_adapter(LoraConfig(r=a.rank, lora_alpha=a.rank, target_modules=LORA_TARGETS))
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = a.size // 16
    x0 = torch.randn(1, g * g, 64, device=dev, dtype=torch.bfloat16)
    ref = torch.randn(1, a.refs * g * g, 64, device=dev, dtype=torch.bfloat16)
    txt = torch.randn(1, a.text_len, 3584, device=dev, dtype=torch.bfloat16)
    shapes = [[(1, g, g)] * (1 + a.refs)]

    def step():
        noise = torch.randn_like(x0)
        sigma = torch.rand(1, device=dev)
        xt = noised_start(x0, noise, sigma)
        out = model(hidden_states=torch.cat([xt, ref], 1), timestep=sigma.to(torch.bfloat16),
                    encoder_hidden_states=txt, encoder_hidden_states_mask=None, img_shapes=shapes,
                    return_dict=False)[0][:, : x0.shape[1]]
        loss, _ = flow_matching_loss(out, noise, x0, sigma)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(a.steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / a.steps
    n = sum(q.numel() for q in model.parameters())
    print(f"{torch.cuda.get_device_name()} | {a.layers} layers, {n / 1e9:.1f}B params | {a.method} | {a.size}px + "
          f"{a.refs} ref | {dt:.2f} s/step | {1 / dt:.3f} samples/s | peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
