"""Precision and recall of each filter on a planted-defect set (see :mod:`.planted`), each stage run alone over
all rows. A filter is judged on the clean rows plus the rows of its own defect classes (a blurred row that the
mosaic filter also drops is neither credit nor blame for the mosaic filter)."""

from __future__ import annotations

from pathlib import Path

from .config import ArtefactConfig, DedupConfig, FineCheckConfig, PairCheckConfig, PhotometricConfig, QualityConfig
from .imageops import single_thread
from .planted import DEFECTS
from .rows import read_rows
from .stages import build_stage

# filter -> (stage config, its defect classes, which decision says "flagged")
FILTERS = {
    "dedup (exact + near)": (DedupConfig(), DEFECTS["dedup"], None),
    "pair_check (L2)": (PairCheckConfig(global_tasks=["style"]), DEFECTS["pair"], None),
    "fine_check (L3)": (FineCheckConfig(global_tasks=["style"]), DEFECTS["pair"], None),
    "photometric (dataset tails)": (PhotometricConfig(), ["overexposed", "underexposed", "desaturated", "blurred",
                                                          "heavy_jpeg"], None),
    "quality (pair-aware)": (QualityConfig(global_tasks=["style"]), ["overexposed", "underexposed", "blurred",
                                                                      "heavy_jpeg", "colour_cast", "noise"], None),
    "artefacts: text / watermark": (ArtefactConfig(), ["text", "logo"], "text"),
    "artefacts: mosaic": (ArtefactConfig(), ["mosaic"], "mosaic"),
    "artefacts: collage": (ArtefactConfig(), ["collage"], "collage"),
    "artefacts: QR / barcode": (ArtefactConfig(), ["qr", "barcode"], "codes"),
}


def evaluate_filters(root: str | Path, truth: dict[str, str], analysis_size: int = 256,
                     work: str | Path | None = None) -> list[dict]:
    """One dict per filter: positives, tp, fp (clean rows flagged), fn, precision, recall."""
    rows, bad = read_rows(root)
    if bad:
        raise ValueError(f"planted set has bad rows: {bad[:3]}")
    ctx = {"output": str(work or root), "analysis_size": analysis_size}
    cache: dict[str, list[dict]] = {}
    out = []
    for name, (cfg, classes, score_key) in FILTERS.items():
        key = cfg.model_dump_json()
        if key not in cache:
            stage = build_stage(cfg.model_dump(), ctx)
            with single_thread():
                scores = [stage.score(r) for r in rows]
            cache[key] = stage.decide(rows, rows, scores).decisions
        decisions = cache[key]
        if score_key is None:
            flagged = {d["row"] for d in decisions if d["verdict"] == "drop"}
        else:
            limit = build_stage(cfg.model_dump(), ctx).limits()[score_key]
            flagged = {d["row"] for d in decisions if d["scores"].get(score_key, 0.0) >= limit}
        judged = {u for u, c in truth.items() if c == "clean" or c in classes}
        positives = {u for u in judged if truth[u] in classes}
        tp = len(flagged & positives)
        fp = len((flagged & judged) - positives)
        fn = len(positives - flagged)
        out.append({"filter": name, "classes": classes, "positives": len(positives), "tp": tp, "fp": fp, "fn": fn,
                    "precision": tp / (tp + fp) if tp + fp else 1.0, "recall": tp / len(positives) if positives else 1.0})
    return out
