"""Data tools: per-filter precision / recall on a planted-defect set, and per-stage throughput, local vs Ray.

    python -m benchmarks.data_filters --clean 60 --per-defect 4 --size 128 [--no-ray]

Each filter runs alone over every row and is judged on the clean rows plus its own defect classes
(firered_core/data/scorecard.py). Throughput: the whole default pipeline over the same set, images scored per
second per stage, with the local engine (2 worker processes) and Ray Data (local, 2 workers); Ray's start-up is
timed separately.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from firered_core.data.config import EngineConfig, load_pipeline_config
from firered_core.data.engines import start_ray
from firered_core.data.scorecard import evaluate_filters
from firered_core.data.extras import available
from firered_core.data.pipeline import run_pipeline
from firered_core.data.planted import make_planted

STAGES = [{"kind": "dedup"}, {"kind": "photometric"}, {"kind": "artefacts"},
          {"kind": "pair_check", "global_tasks": ["style"]}, {"kind": "fine_check", "global_tasks": ["style"]}]


def throughput(root: Path, out: Path, engine: str, workers: int) -> list[dict]:
    cfg = load_pipeline_config(None, input=str(root / "data"), output=str(out), analysis_size=256, stages=STAGES,
                               engine={"kind": engine, "workers": workers, "shard_size": 16})
    result = run_pipeline(cfg)
    return [s for s in result.summary if s.get("images")]


def _warm() -> int:
    """A Ray worker imports the stages (torch, kornia, ...) before the timed runs, as the local pool's forks need not."""
    import importlib

    importlib.import_module("firered_core.data.stages")
    return os.getpid()


def fmt_load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clean", type=int, default=60)
    ap.add_argument("--per-defect", type=int, default=4)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "planted"
        truth = make_planted(root, clean=args.clean, per_defect=args.per_defect, size=args.size, seed=1)
        print(f"planted set: {len(truth)} rows ({args.clean} clean, {args.per_defect} per defect class), "
              f"{args.size} px\n")
        print("| filter | defect classes | planted | TP | FP (clean) | FN | precision | recall |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in evaluate_filters(root / "data", truth, work=Path(tmp) / "eval"):
            print(f"| {r['filter']} | {', '.join(r['classes'])} | {r['positives']} | {r['tp']} | {r['fp']} | "
                  f"{r['fn']} | {r['precision']:.2f} | {r['recall']:.2f} |")
        load_before = fmt_load()
        runs = {"local": throughput(root, Path(tmp) / "out-local", "local", args.workers)}
        ray_start = None
        if not args.no_ray and available("ray"):
            t = time.perf_counter()
            ray = start_ray(EngineConfig(kind="ray", workers=args.workers))
            ray_start = time.perf_counter() - t
            t = time.perf_counter()
            ray.get([ray.remote(num_cpus=1)(_warm).remote() for _ in range(args.workers)])
            warm = time.perf_counter() - t
            runs["ray"] = throughput(root, Path(tmp) / "out-ray", "ray", args.workers)
            same = (Path(tmp) / "out-local/decisions.jsonl").read_bytes() == (Path(tmp) / "out-ray/decisions.jsonl").read_bytes()
            ray.shutdown()
        print(f"\nload average (1 / 5 / 15 min) before: {load_before}, after: {fmt_load()}")
        ray_cols = f" Ray {args.workers} workers img/s | Ray / local |" if "ray" in runs else ""
        print(f"\n| stage | images | local {args.workers} workers img/s |" + ray_cols)
        print("| --- | ---: | ---: |" + (" ---: | ---: |" if "ray" in runs else ""))
        for i, s in enumerate(runs["local"]):
            line = f"| {s['stage']} | {s['images']} | {s['images'] / s['seconds']:.1f} |"
            if "ray" in runs:
                r = runs["ray"][i]
                line += f" {r['images'] / r['seconds']:.1f} | {s['seconds'] / r['seconds']:.2f} |"
            print(line)
        if ray_start is not None:
            print(f"\nRay start-up: ray.init {ray_start:.1f} s, workers importing the stages {warm:.1f} s (not in the "
                  f"table); decisions.jsonl identical local vs Ray: {same}")
        print(json.dumps({"rows": len(truth)}))


if __name__ == "__main__":
    main()
