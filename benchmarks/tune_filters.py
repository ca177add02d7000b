"""Tune the data filters' limits on the TUNE photographs (firered_core/data/photos.py SPLITS["tune"]) and print them
as the stage entries of training/configs/curate.yaml, with the tuning set's own table. The held-out split is never
read here: benchmarks/data_filters.py --photos measures the shipped limits on it.

    python -m benchmarks.tune_filters [--size 96] [--clean-per 8]

The rule (firered_core/data/holdout.py tune_limits): each limit sits two thirds of the way from the clean tuning
rows' 99th percentile to the 10th percentile of the visible defect rows beyond it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from firered_core.data.holdout import TUNED, decide_set, format_table, score_set, table, tune_limits
from firered_core.data.photos import STRENGTHS, make_photo_set


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--clean-per", type=int, default=8)
    ap.add_argument("--analysis-size", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        truth = make_photo_set(tmp, "tune", size=args.size, clean_per=args.clean_per)
        stages = [{"kind": "quality"}, {"kind": "artefacts"}]
        rows, scores = score_set(Path(tmp) / "data", stages, args.analysis_size, work=Path(tmp) / "work")
        limits = tune_limits(truth, rows, scores)
        tuned = [{"kind": k, **{f: v for f, v in limits.items() if TUNED[f][0] == k}} for k in ("quality", "artefacts")]
        print(f"tuning set: {len(truth)} rows, {args.size} px regions, photographs and seeds of SPLITS['tune']\n")
        for entry in tuned:
            print("  - " + json.dumps(entry).replace('"', ""))
        stages = [{**s, **t} for s, t in zip(stages, tuned)]
        what, _ = decide_set(rows, scores, stages, args.analysis_size)
        print("\n" + "\n".join(format_table(table(truth, what), STRENGTHS)))


if __name__ == "__main__":
    main()
