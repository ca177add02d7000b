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
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import (bench_image, cell, machine, our_edit, our_pipeline, peak_rss_mb, psnr,
                               reference_edit, reference_pipeline, run_worker)

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
    stats: dict = {}
    if variant == "reference":
        pipe = reference_pipeline(args.model_dir, args.size * args.size)
        t1 = time.perf_counter()
        pixels = reference_edit(pipe, image, args.size, args.steps)
    else:
        from firered_core.speed import SpeedSettings

        settings = dict(VARIANTS[variant])
        if variant.startswith("cache"):
            settings["cache_threshold"] = args.cache_threshold
        pipe = our_pipeline(args.model_dir, SpeedSettings.from_flat(settings))
        calls: list[int] = []
        pipe.model.text_encoder.register_forward_pre_hook(lambda m, a: calls.append(1))
        if variant == "second edit":
            our_edit(pipe, image, args.size, args.steps)
            calls.clear()
        t1 = time.perf_counter()
        pixels, res = our_edit(pipe, image, args.size, args.steps)
        stats["encoder_runs"] = len(calls)
        if res.stats and "block_cache" in res.stats:
            report = res.stats["block_cache"]
            stats["blocks"] = f"{report['computed']}/{report['total']}"
    edit = time.perf_counter() - t1
    np.save(pixels_file(args.out_dir, variant), pixels)
    return {"variant": variant, "edit_s": edit, "peak_rss_mb": peak_rss_mb(), **stats}


def pixels_file(out_dir: str, variant: str) -> Path:
    return Path(out_dir) / f"{variant.replace(' ', '_').replace('+', '_')}.npy"


def run_variant(variant: str, args) -> dict:
    res = run_worker("benchmarks.speed", ["--worker", variant, "--model-dir", str(args.model_dir), "--size",
                                          str(args.size), "--steps", str(args.steps), "--threads", str(args.threads),
                                          "--cache-threshold", str(args.cache_threshold), "--out-dir", args.out_dir])
    return {"variant": variant, "error": res["error"][:120]} if "error" in res else res


def quality(out_dir: str, variant: str) -> float | None:
    """PSNR of a variant's image against the plain path's (None for plain itself or a missing image)."""
    import numpy as np

    base, other = pixels_file(out_dir, "plain"), pixels_file(out_dir, variant)
    if variant == "plain" or not base.exists() or not other.exists():
        return None
    return psnr(np.load(other), np.load(base))


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
    print(f"machine: {machine(args.threads)}; preset {args.preset}, 1 reference, {args.size}x{args.size} output and VAE "
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
        db = quality(args.out_dir, variant)
        note = []
        if "encoder_runs" in row:
            note.append(f"VL encoder runs {row['encoder_runs']}")
        if "blocks" in row:
            note.append(f"blocks {row['blocks']}")
        print(f"{variant:<14}{row['edit_s']:>8.2f}{cell(t_ref, '7.2f')}{cell(t_plain, '8.2f')}"
              f"{row['peak_rss_mb']:>9.0f}{cell(m_ref, '7.2f')}{cell(db, '9.1f')}  {', '.join(note)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
