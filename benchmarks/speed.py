"""Speed and memory options on a CPU: each against diffusers' QwenImageEditPlusPipeline and our plain path.

Every row runs in a fresh process (peak RSS is its own) on the same random model, image, seed and settings, and
decodes the image; lossy rows print the PSNR of their image against our plain path's beside their speed.

    python -m benchmarks.speed --preset medium --size 256 --steps 16

Rows: ``reference`` (diffusers), ``plain`` (ours, default settings), ``batched_cfg``, ``cache`` /
``cache+taylor`` (block cache), ``int8`` / ``fp8`` (transformer and text encoder weights), ``swap`` (block swap,
2 blocks resident) and ``second edit`` (the same prompt and references again: the VL encoder must not run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.plain import bench_image, peak_rss_mb

VARIANTS: dict[str, dict] = {
    "plain": {},
    "batched_cfg": {"batched_cfg": True},
    "cache": {"cache_first": 1, "cache_last": 1, "cache_warmup": 2, "cache_max_consecutive": 3},
    "cache+taylor": {"cache_first": 1, "cache_last": 1, "cache_warmup": 2, "cache_max_consecutive": 3,
                     "taylorseer": True},
    "int8": {"quantize": "int8", "quantize_text_encoder": "int8"},
    "fp8": {"quantize": "fp8", "quantize_text_encoder": "fp8"},
    "swap": {"block_swap": 2},
    "second edit": {},
}


def worker(variant: str, args) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    image = bench_image(args.size)
    area = args.size * args.size
    prompt, neg, cfg, seed = "make the sky purple", " ", 4.0, 0
    stats: dict = {}
    if variant == "reference":
        import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as mod
        from diffusers import QwenImageEditPlusPipeline

        mod.VAE_IMAGE_SIZE = area
        pipe = QwenImageEditPlusPipeline.from_pretrained(args.model_dir)
        pipe.set_progress_bar_config(disable=True)
        t1 = time.perf_counter()
        pixels = pipe(image=[image], prompt=prompt, negative_prompt=neg, true_cfg_scale=cfg, height=args.size,
                      width=args.size, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(seed),
                      output_type="np").images[0]
    else:
        from firered_core.model import load_model
        from firered_core.pipeline import EditPipeline
        from firered_core.speed import SpeedSettings

        settings = dict(VARIANTS[variant])
        if variant.startswith("cache"):
            settings["cache_threshold"] = args.cache_threshold
        speed = SpeedSettings.from_flat(settings)
        pipe = EditPipeline(load_model(args.model_dir, settings=speed.model), speed.run)
        for name in ("transformer", "vae", "text_encoder", "processor", "scheduler"):
            pipe.model.get(name)
        calls: list[int] = []
        pipe.model.text_encoder.register_forward_pre_hook(lambda m, a: calls.append(1))

        def run():
            return pipe.edit([image], prompt, neg, steps=args.steps, true_cfg=cfg, seed=seed, width=args.size,
                             height=args.size, vae_area=area)
        if variant == "second edit":
            run()
            calls.clear()
        t1 = time.perf_counter()
        res = run()
        pixels = np.asarray(res.images[0], dtype=np.float32) / 255.0
        stats["encoder_runs"] = len(calls)
        if res.stats and "block_cache" in res.stats:
            report = res.stats["block_cache"]
            stats["blocks"] = f"{report['computed']}/{report['total']}"
    edit = time.perf_counter() - t1
    np.save(Path(args.out_dir) / f"{variant.replace(' ', '_').replace('+', '_')}.npy", pixels)
    return {"variant": variant, "edit_s": edit, "peak_rss_mb": peak_rss_mb(), **stats}


def run_variant(variant: str, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.speed", "--worker", variant, "--model-dir", str(args.model_dir),
           "--size", str(args.size), "--steps", str(args.steps), "--threads", str(args.threads),
           "--cache-threshold", str(args.cache_threshold), "--out-dir", args.out_dir]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        return {"variant": variant, "error": out.stderr.strip().splitlines()[-1][:120] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def psnr(out_dir: str, variant: str) -> float | None:
    import numpy as np

    base = Path(out_dir) / "plain.npy"
    other = Path(out_dir) / f"{variant.replace(' ', '_').replace('+', '_')}.npy"
    if variant == "plain" or not base.exists() or not other.exists():
        return None
    mse = float(((np.load(base) - np.load(other)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="medium")
    p.add_argument("--model-dir", default=None, help="random model folder (built if missing)")
    p.add_argument("--size", type=int, default=256, help="output side and reference VAE side (pixels)")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--cache-threshold", type=float, default=0.3)
    p.add_argument("--variants", default=",".join(["reference", *VARIANTS]))
    p.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0

    from firered_core.demo_models import build_model, default_demo_dir

    args.model_dir = Path(args.model_dir or default_demo_dir().with_name(f"bench-{args.preset}"))
    build_model(args.model_dir, args.preset)
    args.out_dir = args.out_dir or tempfile.mkdtemp(prefix="firered-bench-")
    variants = [v for v in args.variants.split(",") if v]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, {args.threads} torch threads"
    print(f"machine: {machine}; preset {args.preset}, 1 reference, {args.size}x{args.size} output and VAE "
          f"reference, {args.steps} steps, true CFG 4, fp32 on cpu; cache threshold {args.cache_threshold}")
    print(f"{'variant':<14}{'edit s':>8}{'x ref':>7}{'x plain':>8}{'RSS MiB':>9}{'x ref':>7}{'PSNR dB':>9}  note",
          flush=True)
    rows: dict[str, dict] = {}
    for variant in variants:
        row = rows[variant] = run_variant(variant, args)
        if "error" in row:
            print(f"{variant:<14}  ERROR {row['error']}", flush=True)
            continue
        ref, plain = rows.get("reference", {}), rows.get("plain", {})
        t_ref = row["edit_s"] / ref["edit_s"] if "edit_s" in ref else None
        t_plain = row["edit_s"] / plain["edit_s"] if "edit_s" in plain else None
        m_ref = row["peak_rss_mb"] / ref["peak_rss_mb"] if "peak_rss_mb" in ref else None
        quality = psnr(args.out_dir, variant)
        note = []
        if "encoder_runs" in row:
            note.append(f"VL encoder runs {row['encoder_runs']}")
        if "blocks" in row:
            note.append(f"blocks {row['blocks']}")
        fmt = lambda v, spec: format(v, spec) if v is not None else "-".rjust(int(spec.split(".")[0]))  # noqa: E731
        print(f"{variant:<14}{row['edit_s']:>8.2f}{fmt(t_ref, '7.2f')}{fmt(t_plain, '8.2f')}"
              f"{row['peak_rss_mb']:>9.0f}{fmt(m_ref, '7.2f')}{fmt(quality, '9.1f')}  {', '.join(note)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
