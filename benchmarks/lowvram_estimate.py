"""Peak VRAM of the low-VRAM LoRA training step, estimated without a GPU: the benchmark's own step
(:func:`benchmarks._lora_step.prepare_lora_step`: FireRed's transformer, bf16 base, fp32 LoRA, one edit row with
its reference image, forward + backward + AdamW) run on fake tensors, its live tensor bytes counted per device.

    python -m benchmarks.lowvram_training --estimate            # full size (60 blocks, 24 heads) at 1024²
    python -m benchmarks.lowvram_estimate --sizes 512 1024 --variants plain "block swap"

No weight is allocated: every tensor is fake (shape, dtype, device), the ``meta`` device stands in for the GPU and
the CPU holds the host side (block swap's copies, offloaded activations). See ``benchmarks._live_bytes`` for what
the count is and what a GPU adds on top of it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import torch
from tqdm import tqdm

from benchmarks._live_bytes import CUDA_BLOCK, STAND_IN, LiveBytes, fake_accelerator, fused_attention_everywhere
from benchmarks._lora_step import VARIANTS, StepShape, prepare_lora_step

GIB = 2**30
CARD_GIB = 24.0
CONTEXT_GIB = 0.5  # CUDA context and kernels: resident on the card, outside the allocator
SLACK = 1.10  # reserved over allocated: the caching allocator's rounding, fragmentation and workspaces


@functools.cache
def import_lazy_modules() -> None:
    """Run a tiny step on real CPU tensors once: diffusers imports some modules on first use, and a module imported
    under fake mode would hold fake module-level tensors (counted in the estimate, and fake for good)."""
    tiny = StepShape(layers=1, heads=1, size=32, text_dim=8, text_tokens=2, rank=1)
    with fused_attention_everywhere():
        prepare_lora_step(tiny, VARIANTS["all"], torch.device("cpu"), torch.bfloat16)[1]()


def estimate_step(shape: StepShape, switches: dict, device: str = STAND_IN, fake: bool = True,
                  round_to: dict[str, int] | None = None) -> dict[str, dict[str, int]]:
    """Live tensor bytes per device type of the step: ``resident`` once everything is set up (weights, LoRA,
    optimizer, inputs) and ``peak`` during the step. ``fake=False`` runs the same code on real tensors (tiny shapes;
    the tests compare the two on the CPU)."""
    import_lazy_modules()
    setup = fake_accelerator() if fake else fused_attention_everywhere()
    with setup, LiveBytes(round_to) as live:
        _, step = prepare_lora_step(shape, switches, torch.device(device), torch.bfloat16, init=not fake)
        resident = nonzero(live.current)
        live.reset_peak()
        step()
        return {"resident": resident, "peak": nonzero(live.peak)}


def nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}


def verdict(peak_gib: float) -> str:
    """Whether a step with ``peak_gib`` of live tensors fits a 24 GiB card: ``yes`` with the allocator's usual slack
    and the CUDA context, ``tight`` without the slack, ``no``."""
    if peak_gib * SLACK + CONTEXT_GIB <= CARD_GIB:
        return "yes"
    return "tight" if peak_gib + CONTEXT_GIB <= CARD_GIB else "no"


def run_tasks(tasks: list[tuple[StepShape, str]], jobs: int) -> list[dict]:
    """Estimate each ``(shape, variant)``: in this process, or split over ``jobs`` worker processes (each runs its
    share in turn; the count is per step, so sharing a process changes nothing)."""
    bar = tqdm(total=len(tasks), desc="estimating", leave=False)
    if jobs <= 1:
        out = []
        for shape, v in tasks:
            out.append(estimate_step(shape, VARIANTS[v], round_to={STAND_IN: CUDA_BLOCK}))
            bar.update()
        return out
    shares = [list(range(k, len(tasks), jobs)) for k in range(min(jobs, len(tasks)))]
    results: dict[int, dict] = {}

    def work(share: list[int]) -> None:
        spec = json.dumps([[asdict(tasks[i][0]), tasks[i][1]] for i in share])
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.lowvram_estimate", "--worker", spec],
                                stdout=subprocess.PIPE, text=True)
        for i, line in zip(share, proc.stdout):
            results[i] = json.loads(line)
            bar.update()
        if proc.wait():
            raise RuntimeError(f"estimate worker for {[tasks[i][1] for i in share]} failed (its stderr is above)")

    with ThreadPoolExecutor(len(shares)) as pool:
        list(pool.map(work, shares))
    return [results[i] for i in range(len(tasks))]


def worker(spec: str) -> None:
    for shape, v in json.loads(spec):
        r = estimate_step(StepShape(**shape), VARIANTS[v], round_to={STAND_IN: CUDA_BLOCK})
        print(json.dumps(r), flush=True)


def table(rows: dict[str, dict]) -> list[str]:
    plain = rows.get("plain")
    lines = [f"{'variant':34} {'set-up GiB':>10} {'peak GiB':>9} {'vs plain':>8} {'host peak GiB':>13} "
             f"{'24 GiB card':>11}"]
    for v, r in rows.items():
        peak = r["peak"].get(STAND_IN, 0) / GIB
        vs = f"{r['peak'][STAND_IN] / plain['peak'][STAND_IN]:8.2f}" if plain else "-".rjust(8)
        host = r["peak"].get("cpu", 0) / GIB
        lines.append(f"{v:34} {r['resident'].get(STAND_IN, 0) / GIB:10.2f} {peak:9.2f} {vs} {host:13.2f} "
                     f"{verdict(peak):>11}")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024])
    ap.add_argument("--text-tokens", type=int, default=256)
    ap.add_argument("--references", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                    help="worker processes (each variant is one step on one core)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    with contextlib.suppress(RuntimeError):
        torch.set_num_threads(1)
    if args.worker:
        worker(args.worker)
        return
    shapes = [StepShape(layers=args.layers, heads=args.heads, size=size, text_tokens=args.text_tokens,
                        references=args.references, rank=args.rank) for size in args.sizes]
    tasks = [(shape, v) for shape in shapes for v in args.variants]
    results = iter(run_tasks(tasks, args.jobs))
    for shape in shapes:
        print(f"\nestimated live bytes of a LoRA step (rank {shape.rank}): {shape.layers} blocks x {shape.heads} "
              f"heads x 128, {shape.size}² target + {shape.references} reference, {shape.text_tokens} text tokens; "
              f"bf16 base, fp32 LoRA, AdamW")
        print("\n".join(table({v: next(results) for v in args.variants})))


if __name__ == "__main__":
    main(sys.argv[1:])
