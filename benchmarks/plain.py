"""Plain-path benchmark: our pipeline vs diffusers' QwenImageEditPlusPipeline at identical settings.

Each side runs in its own fresh process (so peak RSS is its own), on the same random model folder, image, seed and
settings; the table shows wall time of the edit, peak RSS of the process, and ours / reference ratios.

    python -m benchmarks.plain --preset medium --size 512 --steps 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks._common import (add_run_arguments, bench_image, machine, our_edit, our_pipeline, peak_rss_mb,
                               reference_edit, reference_pipeline, run_worker)


def worker(side: str, model_dir: str, size: int, steps: int, threads: int, device: str = "cpu",
           dtype: str = "fp32") -> dict:
    import torch

    from firered_core.model import parse_dtype

    torch.set_num_threads(threads)
    torch_dtype = parse_dtype(dtype)
    image = bench_image(size)
    t0 = time.perf_counter()
    if side == "reference":
        pipe = reference_pipeline(model_dir, size * size, torch_dtype, device)
        load = time.perf_counter() - t0
        t1 = time.perf_counter()
        pixels = reference_edit(pipe, image, size, steps)
    else:
        pipe = our_pipeline(model_dir, None, torch_dtype, device)
        load = time.perf_counter() - t0
        t1 = time.perf_counter()
        pixels, _ = our_edit(pipe, image, size, steps)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    edit = time.perf_counter() - t1
    vram = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0.0
    return {"side": side, "load_s": load, "edit_s": edit, "peak_rss_mb": peak_rss_mb(), "peak_vram_mb": vram,
            "checksum": float(abs(pixels).sum())}


def run_side(side: str, args) -> dict:
    res = run_worker("benchmarks.plain", ["--worker", side, "--model-dir", str(args.model_dir), "--size",
                                          str(args.size), "--steps", str(args.steps), "--threads", str(args.threads),
                                          "--device", args.device, "--dtype", args.dtype])
    if "error" in res:
        raise RuntimeError(f"{side} worker failed:\n{res['stderr']}")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=None, help="random model folder (built if missing)")
    add_run_arguments(p, size=512, steps=4, sides=("ours", "reference"))
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.model_dir, args.size, args.steps, args.threads, args.device,
                                args.dtype)))
        return 0

    from firered_core.demo_models import build_model, default_demo_dir

    args.model_dir = Path(args.model_dir or default_demo_dir().with_name(f"bench-{args.preset}"))
    build_model(args.model_dir, args.preset)
    results: dict[str, list[dict]] = {"reference": [], "ours": []}
    for _ in range(args.repeats):
        for side in ("reference", "ours"):
            results[side].append(run_side(side, args))
    best = {side: min(rs, key=lambda r: r["edit_s"]) for side, rs in results.items()}
    peak = {side: max(r["peak_rss_mb"] for r in rs) for side, rs in results.items()}
    ref, ours = best["reference"], best["ours"]
    print(f"machine: {machine(args.threads, args.device)}; preset {args.preset}, 1 reference, {args.size}x{args.size}, "
          f"{args.steps} steps, true CFG 4, {args.dtype} on {args.device}")
    print(f"{'':<22}{'reference':>12}{'ours':>12}{'ratio':>9}")
    print(f"{'edit wall time (s)':<22}{ref['edit_s']:>12.2f}{ours['edit_s']:>12.2f}"
          f"{ours['edit_s'] / ref['edit_s']:>9.2f}")
    print(f"{'peak RSS (MiB)':<22}{peak['reference']:>12.0f}{peak['ours']:>12.0f}"
          f"{peak['ours'] / peak['reference']:>9.2f}")
    if args.device.startswith("cuda"):
        vram = {side: max(r["peak_vram_mb"] for r in rs) for side, rs in results.items()}
        print(f"{'peak VRAM (MiB)':<22}{vram['reference']:>12.0f}{vram['ours']:>12.0f}"
              f"{vram['ours'] / vram['reference']:>9.2f}")
    print(f"{'load (s)':<22}{ref['load_s']:>12.2f}{ours['load_s']:>12.2f}{ours['load_s'] / ref['load_s']:>9.2f}")
    same = abs(ref["checksum"] - ours["checksum"]) <= 1e-3 * max(1.0, abs(ref["checksum"]))
    print(f"outputs identical (pixel checksum): {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
