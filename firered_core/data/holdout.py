"""Measure curation on a planted photograph set (:mod:`.photos`): every row scored once per stage, the stages'
decisions, and per defect class and strength what was caught; plus the tuning rule that sets the limits on the
``tune`` split (the ``heldout`` split is only ever measured).

A row counts as dropped when any evaluated stage drops it (each stage runs alone over every row: no de-duplication
between them, so each filter meets its own defect). Precision of a class: among the clean rows and the rows of
that class, the share of rows its own detector fired on that are of that class.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from .imageops import single_thread
from .rows import read_rows
from .stages import build_stage

# class -> the scores whose firing counts as that class's detector (precision)
DETECTORS = {"overexposed": {"exposure", "clip_high"}, "underexposed": {"exposure", "clip_low"},
             "colour_cast": {"cast", "wb"}, "blurred": {"detail"}, "jpeg": {"blocky", "detail"},
             "noise": {"noise"}, "mosaic": {"mosaic"}, "text": {"text"}, "logo": {"text"}, "qr": {"codes"}}

# Where a limit sits between the tuning set's clean tail (0) and its visible defects' 10th percentile (1). Clean rows
# of photographs the limits never saw spread wider than the tuning set's (the dev split's heavier textures and
# flatter walls: docs/verification.md), its visible defects hardly do: the limit sits nearer the defects.
TOWARD = 2 / 3

# tuned field -> (stage kind, score, sign, the classes it is for)
TUNED = {
    "exposure_up": ("quality", "exposure", 1, ("overexposed",)),
    "exposure_down": ("quality", "exposure", -1, ("underexposed",)),
    "clip": ("quality", "clip", 1, ("overexposed", "underexposed")),
    "cast": ("quality", "cast", 1, ("colour_cast",)),
    "wb": ("quality", "wb", 1, ("colour_cast",)),
    "blur": ("quality", "detail", -1, ("blurred",)),
    "noise": ("quality", "noise", 1, ("noise",)),
    "blocky": ("quality", "blocky", 1, ("jpeg",)),
    "text": ("artefacts", "text", 1, ("text", "logo")),
    "mosaic": ("artefacts", "mosaic", 1, ("mosaic",)),
}


def score_set(root: str | Path, stages: list[dict], analysis_size: int = 256,
              work: str | Path | None = None) -> tuple[list[dict], dict[str, list[dict]]]:
    """The rows under ``root`` and, per stage kind, every row's scores (one pass per stage, single-threaded)."""
    rows, bad = read_rows(root)
    if bad:
        raise ValueError(f"planted set has bad rows: {bad[:3]}")
    ctx = {"output": str(work or root), "analysis_size": analysis_size}
    scores = {}
    for cfg in stages:
        stage = build_stage(cfg, ctx)
        with single_thread():
            scores[cfg["kind"]] = [stage.score(r) for r in rows]
    return rows, scores


def fired(stage, decision: dict) -> set[str]:
    """The scores whose limits a decision crossed (what fired), or the kind of pair drop."""
    s = decision["scores"]
    if stage.kind == "quality":
        return {k for k, checks in stage.limits().items() for v, sign, _ in checks if k in s and sign * s[k] > v}
    if stage.kind == "artefacts":
        return {k for k, v in stage.limits().items() if s.get(k, 0.0) >= v}
    return {decision["reason"].split(":")[0]} if decision["verdict"] == "drop" else set()


def decide_set(rows: list[dict], scores: dict[str, list[dict]], stages: list[dict],
               analysis_size: int = 256) -> tuple[dict[str, set[str]], dict[str, str]]:
    """Per row: what fired (over all stages) and the first drop reason."""
    what: dict[str, set[str]] = defaultdict(set)
    reason: dict[str, str] = {}
    for cfg in stages:
        stage = build_stage(cfg, {"output": "/nonexistent", "analysis_size": analysis_size})
        for d in stage.decide(rows, rows, scores[cfg["kind"]]).decisions:
            if d["verdict"] == "drop":
                what[d["row"]] |= fired(stage, d)
                reason.setdefault(d["row"], f"{cfg['kind']}: {d['reason']}")
    return what, reason


def table(truth: dict[str, dict], what: dict[str, set[str]], levels: int = 3) -> dict:
    """Per class: recall at each level, recall over its visible rows, precision, and the weakest level caught at
    >= 0.9; and the clean rows kept."""
    clean = [u for u, t in truth.items() if t["class"] == "clean"]
    out: dict = {"clean": len(clean), "clean_kept": sum(1 for u in clean if u not in what) / max(1, len(clean)),
                 "classes": {}}
    for cls in sorted({t["class"] for t in truth.values()} - {"clean"}):
        mine = [u for u, t in truth.items() if t["class"] == cls]
        per = []
        for lv in range(levels):
            at = [u for u in mine if truth[u]["level"] == lv]
            per.append((sum(1 for u in at if u in what), len(at)))
        vis = [u for u in mine if truth[u]["visible"]]
        det = DETECTORS.get(cls, set())
        flagged = [u for u in mine + clean if what.get(u, set()) & det]
        tp = sum(1 for u in flagged if truth[u]["class"] == cls)
        caught_from = next((lv for lv, (k, n) in enumerate(per) if n and k / n >= 0.9
                            and all(k2 / n2 >= 0.9 for k2, n2 in per[lv:] if n2)), None)
        out["classes"][cls] = {"levels": per, "visible": len(vis),
                               "visible_recall": sum(1 for u in vis if u in what) / len(vis) if vis else 1.0,
                               "precision": tp / len(flagged) if flagged else 1.0, "caught_from": caught_from}
    return out


def _value(s: dict, score: str) -> float:
    if score == "clip":  # one limit for both ends
        return max(s.get("clip_high", 0.0), s.get("clip_low", 0.0))
    return s.get(score, 0.0)


def tune_limits(truth: dict[str, dict], rows: list[dict], scores: dict[str, list[dict]],
                clean_share: float = 0.01, toward: float = TOWARD) -> dict[str, float]:
    """The tuning rule, applied to one (tuning) set: for each limit, ``toward`` of the way from the clean rows' tail
    (the value all but ``clean_share`` of them stay within, in the defect's direction) to the 10th percentile of
    the visible defect rows beyond it: still below nine in ten visible defects (a tenth beyond the clean tail when
    no defect is beyond it). Nothing else is fitted."""
    by_uid = {r["uid"]: i for i, r in enumerate(rows)}
    out = {}
    for field, (kind, score, sign, classes) in TUNED.items():
        if kind not in scores:
            continue
        vals = {u: sign * _value(scores[kind][i], score) for u, i in by_uid.items()}
        clean = float(np.quantile([v for u, v in vals.items() if truth[u]["class"] == "clean"], 1 - clean_share,
                                  method="higher"))
        beyond = [v for u, v in vals.items() if truth[u]["class"] in classes and truth[u]["visible"] and v > clean]
        cut = clean + toward * (float(np.quantile(beyond, 0.1)) - clean) if beyond else clean + 0.1 * abs(clean)
        out[field] = float(f"{cut:.3g}")
    return out


def format_table(result: dict, strengths: dict) -> list[str]:
    """Markdown lines: class, recall per strength, visible rows and their recall, precision, caught from."""
    lines = ["| class | strengths | recall per strength | visible rows | recall (visible) | precision | "
             "caught from |", "| --- | --- | --- | ---: | ---: | ---: | --- |"]
    for cls, r in result["classes"].items():
        values, unit = strengths[cls]
        per = " / ".join(f"{k}/{n}" for k, n in r["levels"])
        lv = r["caught_from"]
        lines.append(f"| {cls} | {', '.join(f'{v:g}' for v in values)} ({unit}) | {per} | {r['visible']} | "
                     f"{r['visible_recall']:.2f} | {r['precision']:.2f} | "
                     f"{'not caught' if lv is None else f'{values[lv]:g}'} |")
    lines.append(f"\nclean rows kept: {result['clean_kept']:.3f} of {result['clean']}")
    return lines


def summary_numbers(result: dict) -> dict[str, float]:
    return {"clean_kept": result["clean_kept"],
            "worst_visible_recall": float(np.min([r["visible_recall"] for r in result["classes"].values()]))}
