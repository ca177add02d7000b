"""Automatic preservation on real photographs with planted edits: IoU of the returned mask (the estimated edit region,
or the whole picture when the estimate is unsure) with the planted region, and whether every pixel outside it is the
input's own (8-bit), per case and in total.

The thresholds of ``firered_core.preserve.PreserveSettings`` were tuned on ``--set tuning``; report ``--set
held-out`` (the default) at the fresh seeds ``planted_edits.FRESH_SEEDS`` (the default ``--seeds``), declared before
the last tuning round and run once at its end (earlier draws: ``planted_edits.LOOKED_AT_SEEDS``). Each case: a local change over 2-40 % of the picture, a colour
drift, a 0-3 px shift and/or 0-2 % zoom, tiny-VAE round-trip noise at 30-36 dB, 8-bit rounding
(``firered_core.evaluation.planted_edits``).

    python -m benchmarks.preserve --side 192 --per-photo 3 --seeds 21,22,23,24
    python -m benchmarks.preserve --set tuning --seeds 0,1,2,3      # and --set analogues / hazy: what was tuned on
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from tqdm import tqdm


def main(argv: list[str] | None = None) -> None:
    from firered_core import preserve as PV
    from firered_core.evaluation import planted_edits as P

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", choices=("held-out", "tuning", "analogues", "hazy"), default="held-out",
                   help="analogues: tiled TUNING photographs, the tuning side's periodic textures; hazy: blurred, "
                   "low-contrast TUNING photographs, its pictures with little structure")
    p.add_argument("--side", type=int, default=192, help="longer side of each photograph (pixels)")
    p.add_argument("--per-photo", type=int, default=3, help="planted cases per photograph")
    p.add_argument("--seeds", default=",".join(map(str, P.FRESH_SEEDS)), help="draws, comma-separated")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = {"held-out": P.HELD_OUT, "tuning": P.TUNING, "analogues": P.ANALOGUE_PHOTOS, "hazy": P.TUNING}[args.set]
    seeds = [int(v) for v in args.seeds.split(",")]
    print(f"set: {args.set} ({', '.join(names)}); side {args.side} px; {args.per_photo} cases per photograph; "
          f"seeds {seeds}")
    print("| seed | photograph | kind | geometry | planted % | estimated % | IoU | outside bit-exact | confidence "
          "| s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ious, exact, secs, rows = [], [], [], []
    draw = {"analogues": P.analogue_cases, "hazy": P.hazy_cases}.get(
        args.set, lambda *a, seed: P.cases(names, *a, seed=seed))
    drawn = [(seed, case) for seed in seeds for case in draw(args.side, args.per_photo, seed=seed)]
    for seed, case in tqdm(drawn, desc="estimates", leave=False):
        t = time.perf_counter()
        result = PV.preserve(case.source, case.edited)
        secs.append(time.perf_counter() - t)
        est = result.estimate
        keep = ~est.region.numpy()
        ok = bool((P.to_8bit(result.image)[keep] == P.to_8bit(case.source)[keep]).all())
        ious.append(P.iou(result.mask > 0, case.region))  # what the user gets: unsure -> the whole picture
        exact.append(ok or est.unsure)
        q = case.params
        rows.append((seed, case.name, ious[-1], case.params["kind"]))
        tqdm.write(f"| {seed} | {case.name} | {q['kind']} | {q['geometry']} (d {q['dx']:+.1f},{q['dy']:+.1f}; zoom "
              f"{100 * (q['zoom'] - 1):.1f} %) | {100 * q['fraction']:.1f} | {100 * est.fraction:.1f} | "
              f"{ious[-1]:.3f} | {'unsure: whole' if est.unsure else 'yes' if ok else 'NO'} | "
              f"{est.confidence:.2f} | {secs[-1]:.2f} |")
    print("\n| draw | cases | IoU mean | median | min | share >= 0.9 |\n|---|---|---|---|---|---|")
    groups = [(f"seed {s}", [r[2] for r in rows if r[0] == s]) for s in seeds]
    groups += [(name, [r[2] for r in rows if r[1] == name]) for name in names]
    groups += [(kind, [r[2] for r in rows if r[3] == kind]) for kind in P.KINDS]
    for label, vals in groups + [("all", [r[2] for r in rows])]:
        v = np.array(vals)
        print(f"| {label} | {len(v)} | {v.mean():.3f} | {np.median(v):.3f} | {v.min():.3f} | {(v >= 0.9).mean():.2f} |")
    spread = np.std([np.mean([r[2] for r in rows if r[0] == s]) for s in seeds], ddof=1) if len(seeds) > 1 else 0.0
    print(f"\noutside bit-exact (or unsure and returned whole): {sum(exact)}/{len(exact)}; "
          f"seed-to-seed sd of the mean IoU {spread:.3f}; "
          f"{np.mean(secs):.2f} s per estimate")


if __name__ == "__main__":
    main()
