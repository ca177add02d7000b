"""Data tools: the held-out real-photograph table, per-filter precision / recall on the synthetic planted set, and
per-stage throughput, local vs Ray.

    python -m benchmarks.data_filters --clean 60 --per-defect 4 --size 128 [--no-ray] [--no-photos]

Held out: the photographs and seeds of SPLITS["heldout"] (firered_core/data/photos.py), which no limit was tuned
on (benchmarks/tune_filters.py tunes on SPLITS["tune"]), judged with the stages exactly as
training/configs/curate.yaml ships them; a row is caught when any of them drops it.

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
from firered_core.data.holdout import decide_set, format_table, score_set, table
from firered_core.data.photos import STRENGTHS, make_photo_set
from firered_core.data.pipeline import run_pipeline
from firered_core.data.planted import make_planted

STAGES = [{"kind": "dedup"}, {"kind": "photometric"}, {"kind": "quality", "global_tasks": ["style"]},
          {"kind": "artefacts"}, {"kind": "pair_check", "global_tasks": ["style"]},
          {"kind": "fine_check", "global_tasks": ["style"]}]
SHIPPED = Path(__file__).resolve().parents[1] / "training" / "configs" / "curate.yaml"
JUDGED = ("quality", "artefacts", "pair_check", "fine_check")


def shipped_stages(kinds: tuple[str, ...] = JUDGED) -> list[dict]:
    """The stages of the shipped config, as shipped (the held-out table measures exactly these)."""
    cfg = load_pipeline_config(SHIPPED, ["input=/in", "output=/out"])
    return [s.model_dump() for s in cfg.stages if s.kind in kinds]


def heldout_table(root: Path, size: int, clean_per: int, seeds: tuple[int, ...] | None = None,
                  split: str = "heldout") -> dict:
    """The table of one photograph split (``heldout`` unless told: ``dev`` for diagnosing) with the shipped stages."""
    truth = make_photo_set(root, split, size=size, clean_per=clean_per, seeds=seeds)
    stages = shipped_stages()
    rows, scores = score_set(root / "data", stages, 256, work=root / "work")
    what, _ = decide_set(rows, scores, stages, 256)
    return {"rows": len(truth), "result": table(truth, what)}


def throughput(root: Path, out: Path, engine: str, workers: int) -> list[dict]:
    cfg = load_pipeline_config(None, input=str(root / "data"), output=str(out), analysis_size=256, stages=STAGES,
                               engine={"kind": engine, "workers": workers, "shard_size": 16})
    result = run_pipeline(cfg)
    return [s for s in result.summary if s.get("images")]


def synthetic_floors(decisions: Path, truth: dict[str, str]) -> str:
    """The whole default pipeline on the synthetic set: each defect class's rows dropped, and clean rows kept."""
    dropped = {json.loads(x)["row"] for x in decisions.read_text().splitlines() if '"verdict": "drop"' in x}
    classes = sorted(set(truth.values()) - {"clean"})
    clean = [u for u, c in truth.items() if c == "clean"]
    per = {c: (sum(1 for u, k in truth.items() if k == c and u in dropped), sum(1 for k in truth.values() if k == c))
           for c in classes}
    kept = sum(1 for u in clean if u not in dropped) / len(clean)
    return ("synthetic set, whole pipeline (dedup first): recall per class " +
            ", ".join(f"{c} {k}/{n}" for c, (k, n) in per.items()) + f"; clean rows kept {kept:.3f} of {len(clean)}")


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
    ap.add_argument("--no-photos", action="store_true")
    ap.add_argument("--photo-size", type=int, default=96)
    ap.add_argument("--photo-clean", type=int, default=8, help="clean rows per photograph and seed")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_photos:
            got = heldout_table(Path(tmp) / "photos", args.photo_size, args.photo_clean)
            print(f"held-out photographs (SPLITS['heldout']): {got['rows']} rows, {args.photo_size} px regions, "
                  f"stages as shipped in training/configs/curate.yaml\n")
            print("\n".join(format_table(got["result"], STRENGTHS)) + "\n")
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
        print("\n" + synthetic_floors(Path(tmp) / "out-local" / "decisions.jsonl", truth))
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
