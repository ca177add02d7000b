"""Automatic preservation on real photographs with planted edits: IoU of the estimated edit region with the planted
one, and whether every pixel outside it is the input's own (8-bit), per case and in total.

The thresholds of ``firered_core.preserve.PreserveSettings`` were tuned on ``--set tuning``; report ``--set
held-out`` (the default), which they never saw. Each case: a local change over 2-40 % of the picture, a colour
drift, a 0-3 px shift and/or 0-2 % zoom, tiny-VAE round-trip noise at 30-36 dB, 8-bit rounding
(``firered_core.evaluation.planted_edits``).

    python benchmarks/preserve.py --side 192 --per-photo 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main(argv: list[str] | None = None) -> None:
    from firered_core import preserve as PV
    from firered_core.evaluation import planted_edits as P

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", choices=("held-out", "tuning"), default="held-out")
    p.add_argument("--side", type=int, default=192, help="longer side of each photograph (pixels)")
    p.add_argument("--per-photo", type=int, default=2, help="planted cases per photograph")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = P.HELD_OUT if args.set == "held-out" else P.TUNING
    print(f"set: {args.set} ({', '.join(names)}); side {args.side} px; {args.per_photo} cases per photograph; "
          f"seed {args.seed}")
    print(f"| photograph | kind | geometry | planted % | estimated % | IoU | outside bit-exact | confidence | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    ious, exact, secs = [], [], []
    for case in P.cases(names, args.side, args.per_photo, seed=args.seed):
        t = time.perf_counter()
        result = PV.preserve(case.source, case.edited)
        secs.append(time.perf_counter() - t)
        est = result.estimate
        keep = ~est.region.numpy()
        ok = bool((P.to_8bit(result.image)[keep] == P.to_8bit(case.source)[keep]).all())
        ious.append(P.iou(est.region, case.region))
        exact.append(ok)
        q = case.params
        print(f"| {case.name} | {q['kind']} | {q['geometry']} (d {q['dx']:+.1f},{q['dy']:+.1f}; zoom "
              f"{100 * (q['zoom'] - 1):.1f} %) | {100 * q['fraction']:.1f} | {100 * est.fraction:.1f} | "
              f"{ious[-1]:.3f} | {'yes' if ok else 'NO'} | {est.confidence:.2f} | {secs[-1]:.2f} |")
    ious = np.array(ious)
    print(f"\n{len(ious)} cases: IoU mean {ious.mean():.3f}, median {np.median(ious):.3f}, min {ious.min():.3f}, "
          f"share >= 0.9: {(ious >= 0.9).mean():.2f}; outside bit-exact: {sum(exact)}/{len(exact)}; "
          f"{np.mean(secs):.2f} s per estimate")


if __name__ == "__main__":
    main()
