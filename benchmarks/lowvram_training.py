"""Peak memory of one LoRA training step with each low-VRAM switch (fp8 base, block swap, checkpointing, activation
offload, and combinations) against plain LoRA training, one fresh process per variant, as ratios to plain.

    python -m benchmarks.lowvram_training                      # CPU: peak RSS of the step, small transformer
    python -m benchmarks.lowvram_training --device cuda --layers 60 --heads 24 --size 1024   # full size, peak VRAM
    python -m benchmarks.lowvram_training --estimate           # no GPU: the full-size table from fake tensors

The step is one FireRed edit row as the trainer builds it: the target's tokens then one reference image's (same
size; ``img_shapes`` with both), a 256-token instruction at the text encoder's width (3584), forward + backward of
the flow-matching loss, then an AdamW step on the LoRA. The transformer is the FireRed architecture with random
weights (``_common.full_size_transformer``); the frozen base is bf16 on a GPU (fp32 on a CPU), the LoRA (rank 16,
FireRed's targets) fp32. The step's peak is measured after the model is built and converted (VmHWM reset through
/proc/self/clear_refs on Linux; CUDA's peak statistics on a GPU), so it is the step's own: the table gives the
process's peak RSS and the step's growth over the RSS before it (on a CPU) or the peak VRAM (on a GPU), each as a
ratio to plain. The loss of each variant and its relative difference to plain's show the switches keep the step's
result (the equal-loss check itself is a test: tests/test_posttrain_lowvram.py). ``--estimate`` runs
``benchmarks.lowvram_estimate`` (its options follow) on the same step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from benchmarks._common import cell, machine, peak_rss_mb, peak_vram_gib, reset_peak, run_worker, sync
from benchmarks._lora_step import VARIANTS, StepShape, prepare_lora_step

def reset_rss_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def worker(args) -> dict:
    device = torch.device(args.device)
    base_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tr, step = prepare_lora_step(shape_of(args), VARIANTS[args.variant], device, base_dtype)
    sync(device)
    weights_mb = sum(t.numel() * t.element_size() for t in list(tr.parameters()) + list(tr.buffers())
                     if t.device == device) / 2**20
    reset_peak(device)
    reset_rss_peak()
    start_rss = peak_rss_mb()
    loss = step()
    sync(device)
    return {"loss": float(loss), "weights_mb": weights_mb, "rss_before_mb": start_rss, "peak_rss_mb": peak_rss_mb(),
            "peak_vram_gib": peak_vram_gib(device)}


def shape_of(args) -> StepShape:
    return StepShape(layers=args.layers, heads=args.heads, size=args.size, text_tokens=args.text_tokens,
                     references=args.references)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--estimate" in argv:
        from benchmarks.lowvram_estimate import main as estimate

        argv.remove("--estimate")
        estimate(argv)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--text-tokens", type=int, default=256)
    ap.add_argument("--references", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.variant:
        print(json.dumps(worker(args)))
        return
    print(f"LoRA step, {args.layers} blocks x {args.heads} heads x 128, {args.size}², {args.device}: "
          f"{machine(args.threads, args.device)}")
    base = ["--device", args.device, "--layers", str(args.layers), "--heads", str(args.heads), "--size",
            str(args.size), "--text-tokens", str(args.text_tokens), "--references", str(args.references),
            "--threads", str(args.threads)]
    rows = {v: run_worker("benchmarks.lowvram_training", [*base, "--variant", v]) for v in VARIANTS}
    plain = rows["plain"]
    print(f"{'variant':34} {'weights MiB':>11} {'peak RSS MiB':>12} {'vs plain':>8} {'step growth MiB':>15} "
          f"{'vs plain':>8} {'peak VRAM GiB':>13} {'vs plain':>8} {'loss':>9} {'rel. diff':>9}")
    for v, r in rows.items():
        if "error" in r:
            print(f"{v:34} error: {r['error']}")
            continue
        r["growth_mb"] = r["peak_rss_mb"] - r["rss_before_mb"]
        loss_ratio = ratio(r, plain, "loss")
        print(f"{v:34} {r['weights_mb']:11.0f} {r['peak_rss_mb']:12.0f} {cell(ratio(r, plain, 'peak_rss_mb'), '8.2f')} "
              f"{r['growth_mb']:15.0f} {cell(ratio(r, plain, 'growth_mb'), '8.2f')} "
              f"{cell(r['peak_vram_gib'], '13.2f')} {cell(ratio(r, plain, 'peak_vram_gib'), '8.2f')} "
              f"{r['loss']:9.6f} {cell(None if loss_ratio is None else loss_ratio - 1, '9.1e')}")


def ratio(row: dict, plain: dict, key: str) -> float | None:
    """``row[key] / plain[key]``, or None when either is missing (no GPU, a failed worker)."""
    a, b = row.get(key), plain.get(key)
    return a / b if isinstance(a, float) and isinstance(b, float) and b else None


if __name__ == "__main__":
    main(sys.argv[1:])
