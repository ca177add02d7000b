"""What the benchmark scripts share: memory readers, PSNR, the bench image, the full-size transformer, the two
pipelines at identical settings, worker subprocesses and table cells."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

PROMPT, NEGATIVE, TRUE_CFG, SEED = "make the sky purple", " ", 4.0, 0
COMPONENTS = ("transformer", "vae", "text_encoder", "processor", "scheduler")


def add_run_arguments(p, size: int, steps: int, sides: tuple[str, ...]) -> None:
    """The options every side-by-side benchmark takes: preset, size, steps, threads, device, dtype, repeats and the
    hidden ``--worker SIDE`` its fresh processes are started with."""
    import argparse

    p.add_argument("--preset", default="medium")
    p.add_argument("--size", type=int, default=size, help="output side and reference VAE side (pixels)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--repeats", type=int, default=1, help="alternate runs per side; the best time is kept")
    p.add_argument("--worker", choices=sides, help=argparse.SUPPRESS)


def status_mb(field: str) -> float:
    """A memory line of /proc/self/status (``VmRSS``, ``VmHWM``, ``RssAnon``...) in MiB (Linux only)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM; ru_maxrss where /proc is missing), in MiB."""
    try:
        return status_mb("VmHWM")
    except (OSError, RuntimeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """Start a new device-memory peak (CUDA; nothing on a CPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_vram_gib(device: torch.device) -> float | None:
    """Peak allocated device memory since :func:`reset_peak`, in GiB (None on a CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def psnr(image, reference) -> float:
    """PSNR in dB of two images with values in [0, 1] (numpy arrays or tensors); inf when identical."""
    a = image.float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, dtype=np.float64)
    b = reference.float().cpu().numpy() if isinstance(reference, torch.Tensor) else np.asarray(reference,
                                                                                                dtype=np.float64)
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def bench_image(size: int):
    """The benchmark input: a ``size`` x ``3/4 size`` picture of gradients and noise, the same on every run."""
    from PIL import Image

    rs = np.random.RandomState(0)
    h, w = size * 3 // 4, size
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x / w, y / h, rs.rand(h, w) * 0.3], -1)
    return Image.fromarray((arr.clip(0, 1) * 255).astype("uint8"))


def full_size_transformer(layers: int, heads: int, text_dim: int, seed: int, device: torch.device,
                          dtype: torch.dtype, init: bool = True):
    """The FireRed transformer architecture (``heads`` x 128, ``layers`` blocks) with random weights built directly
    on the device (meta construction, no CPU copy), deterministic for the seed; ``init=False`` leaves the weights
    unset (fake tensors, which hold no values)."""
    from diffusers import QwenImageTransformer2DModel
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    config = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=layers, attention_head_dim=128,
                  num_attention_heads=heads, joint_attention_dim=text_dim, axes_dims_rope=(16, 56, 56))
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            tr = QwenImageTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(default)
    tr.to_empty(device=device)
    tr.pos_embed = QwenEmbedRope(theta=10000, axes_dim=[16, 56, 56], scale_rope=True)
    if not init:
        return tr.eval().requires_grad_(False)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in tr.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.5 / math.sqrt(p.shape[1]), generator=gen)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.zero_()
    return tr.eval().requires_grad_(False)


def reference_pipeline(model_dir, area: int, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """diffusers' QwenImageEditPlusPipeline on ``model_dir``, its VAE reference area set to ``area``."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as mod
    from diffusers import QwenImageEditPlusPipeline

    mod.VAE_IMAGE_SIZE = area
    pipe = QwenImageEditPlusPipeline.from_pretrained(model_dir, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_edit(pipe, image, size: int, steps: int) -> np.ndarray:
    """One edit by the reference pipeline at the benchmark settings: float pixels in [0, 1], HWC."""
    return pipe(image=[image], prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=TRUE_CFG, height=size,
                width=size, num_inference_steps=steps, generator=torch.Generator().manual_seed(SEED),
                output_type="np").images[0]


def our_pipeline(model_dir, speed=None, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Our EditPipeline on ``model_dir`` (``speed``: a SpeedSettings, its model part to the model and its run part
    to the pipeline) with every component loaded now, so an edit times only the edit."""
    from firered_core.model import load_model
    from firered_core.pipeline import EditPipeline

    model = load_model(model_dir, dtype=dtype, device=device, settings=speed.model if speed is not None else None)
    pipe = EditPipeline(model, speed.run if speed is not None else None)
    for name in COMPONENTS:
        pipe.model.get(name)
    return pipe


def our_edit(pipe, image, size: int, steps: int):
    """One edit by our pipeline at the benchmark settings (the reference's VAE area): ``(pixels in [0, 1], result)``."""
    res = pipe.edit([image], PROMPT, NEGATIVE, steps=steps, true_cfg=TRUE_CFG, seed=SEED, width=size, height=size,
                    vae_area=size * size)
    return np.asarray(res.images[0], dtype=np.float32) / 255.0, res


def run_worker(module: str, argv: list[str]) -> dict:
    """Run ``python -m module argv`` in a fresh process (its peak memory its own); its last stdout line is JSON.
    A failed worker gives ``{"error": last stderr line}``."""
    out = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, check=False)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1][:300] if out.stderr.strip() else "failed",
                "stderr": out.stderr[-3000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine(threads: int | None = None, device: str = "cpu") -> str:
    """The machine in words: CPU (and the GPU for a CUDA ``device``), CPU count, torch threads."""
    name = platform.processor() or platform.machine()
    if device.startswith("cuda"):
        name = f"{torch.cuda.get_device_name()} + {name}"
    return f"{name}, {os.cpu_count()} cpus" + (f", {threads} torch threads" if threads else "")


def cell(value, spec: str) -> str:
    """A table cell: ``value`` formatted by ``spec`` (e.g. ``'8.2f'``), or a right-aligned ``-`` when missing."""
    width = int(spec.split(".")[0].rstrip("%f"))
    return format(value, spec) if isinstance(value, (int, float)) else "-".rjust(width)
