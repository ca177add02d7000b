"""Drift of edit chains: PSNR of the never-edited region against the original after N = 1..8 rounds, for a naive
chain (each round's whole output becomes the next input: decode, re-encode, edit) and for ours (``preserve="auto"``,
``chains.edit_chain``), and the time per round.

Each round's "model" is ``planted_edits.PlantedEditor``: a local change (3 % of the picture, a new place each
round), a colour drift, a 0-3 px shift and/or 0-2 % zoom, tiny-VAE noise at 30-36 dB, 8-bit rounding: what a real
editor's round trip does to the untouched pixels. With ``--real``, a second table times real rounds of the tiny
model (sampler + VAE) with and without preserve, to show the estimate's cost beside a round's.

    python benchmarks/edit_chain.py --photo chelsea --side 256
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float((((a.astype(np.float64) - b.astype(np.float64)) / 255.0) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def planted_table(photo: str, other: str, side: int, rounds: int, seed: int) -> None:
    from firered_core import chains as C
    from firered_core.evaluation import planted_edits as P
    from firered_core.images import tensor_to_pil

    src = tensor_to_pil(P.photo(photo, side))
    P.tiny_vae()  # built once, before the clock starts
    editor = P.PlantedEditor(P.photo(other, side))
    prompts = [f"edit {k + 1}" for k in range(rounds)]
    times: dict[str, list[float]] = {"off": [], "auto": []}
    chains = {}
    for mode in ("off", "auto"):
        last = [time.perf_counter()]

        def tick(k, result, mode=mode, last=last):
            now = time.perf_counter()
            times[mode].append(now - last[0])
            last[0] = now
        chains[mode] = C.edit_chain(editor, [src], prompts, preserve=mode, seed=seed, on_round=tick)
    ours = chains["auto"]
    original = np.asarray(src)
    print(f"photograph {photo} ({src.width}x{src.height}), content from {other}; seed {seed}; planted rounds\n")
    print("| rounds N | never-edited pixels | PSNR naive (dB) | PSNR ours (dB) | ours bit-exact | s/round naive "
          "| s/round ours |")
    print("|---|---|---|---|---|---|---|")
    for n in range(1, rounds + 1):
        union = torch.stack(ours.masks[:n]).amax(0).numpy() > 0
        keep = ~union
        naive_img, our_img = np.asarray(chains["off"].rounds[n - 1]), np.asarray(ours.rounds[n - 1])
        exact = bool((our_img[keep] == original[keep]).all())
        p_naive, p_ours = psnr(naive_img[keep], original[keep]), psnr(our_img[keep], original[keep])
        print(f"| {n} | {100 * keep.mean():.1f} % | {p_naive:.2f} | {'inf' if math.isinf(p_ours) else f'{p_ours:.2f}'}"
              f" | {'yes' if exact else 'NO'} | {times['off'][n - 1]:.2f} | {times['auto'][n - 1]:.2f} |")
    print("\n(s/round: the planted model's own round plus, for ours, the estimate and composite)")


def real_table(side: int, rounds: int, steps: int) -> None:
    from firered_core import chains as C
    from firered_core.demo_models import build_model, default_demo_dir
    from firered_core.evaluation import planted_edits as P
    from firered_core.images import tensor_to_pil
    from firered_core.model import load_model
    from firered_core.pipeline import EditPipeline

    pipe = EditPipeline(load_model(build_model(default_demo_dir(), "tiny")))
    src = tensor_to_pil(P.photo("astronaut", side))
    print(f"\ntiny model, {src.width}x{src.height}, {steps} steps, true CFG off, exact-size path\n")
    print("| preserve | s/round (mean of rounds) | rounds reusing the previous latent |")
    print("|---|---|---|")
    for mode in ("off", "auto"):
        t = time.perf_counter()
        chain = C.edit_chain(pipe, [src], [f"edit {k}" for k in range(rounds)], preserve=mode, steps=steps,
                             true_cfg=1.0, vl_area=56 * 56, match_input=True)
        print(f"| {mode} | {(time.perf_counter() - t) / rounds:.2f} | {chain.reused} of {rounds} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photo", default="chelsea")
    p.add_argument("--other", default="coffee", help="photograph the planted content comes from")
    p.add_argument("--side", type=int, default=256)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--real", action="store_true", help="also time real tiny-model rounds")
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    planted_table(args.photo, args.other, args.side, args.rounds, args.seed)
    if args.real:
        real_table(min(args.side, 128), 3, args.steps)


if __name__ == "__main__":
    main()
