"""Pair-aware quality: each row's target judged against its own source outside the edited region
(:mod:`..pairquality`). A target that is brighter or darker, colour-cast, blurrier, noisier or more compressed than
its source where the edit did not reach was damaged; fixed limits (tuned on held-apart photographs, see
``benchmarks/tune_filters.py``) decide. Rows without a source, and tasks that change the whole picture
(``global_tasks``), are left to the dataset-level tails of the photometric stage."""

from __future__ import annotations

import numpy as np

from ..imageops import downscale, load_rgb, resize_to
from ..pairquality import pair_quality
from .base import DROP, KEEP, Stage, StageResult, decision

# score -> (config field, direction, what the reason says)
CHECKS = {
    "exposure": (("exposure_up", 1, "stops brighter"), ("exposure_down", -1, "stops darker")),
    "clip_high": (("clip", 1, "more of the picture blown out"),),
    "clip_low": (("clip", 1, "more of the picture crushed to black"),),
    "cast": (("cast", 1, "Lab a*/b* colour shift"),),
    "wb": (("wb", 1, "white-balance gain error"),),
    "detail": (("blur", -1, "log detail lost (blur / smoothing)"),),
    "noise": (("noise", 1, "levels of noise added (sigma)"),),
    "blocky": (("blocky", 1, "JPEG block-grid ratio added"),),
}


def _closest(target: np.ndarray, sources: list[np.ndarray]) -> int:
    """The source most like the target (32 px thumbnails, mean absolute difference): the pair's reference."""
    t = resize_to(target, (32, 32)).astype(np.float64)
    return int(np.argmin([np.abs(resize_to(s, (32, 32)).astype(np.float64) - t).mean() for s in sources]))


class QualityStage(Stage):
    kind = "quality"

    def score(self, row: dict) -> dict:
        if not row["sources"] or row["task"] in self.cfg.global_tasks:
            return {}
        size = self.ctx.analysis_size
        full_t = load_rgb(row["target"])
        fulls = [load_rgb(p) for p in row["sources"]]
        small_s = [downscale(a, size) for a in fulls]
        k = _closest(downscale(full_t, size), small_s)
        return {**pair_quality(small_s[k], downscale(full_t, size), tgt_full=full_t, src_full=fulls[k]),
                "reference": k + 1}

    def limits(self) -> dict[str, list[tuple[float, int, str]]]:
        out: dict[str, list[tuple[float, int, str]]] = {}
        for score, checks in CHECKS.items():
            for field, sign, what in checks:
                v = getattr(self.cfg, field)
                if v is not None:
                    out.setdefault(score, []).append((float(v), sign, what))
        return out

    def decide(self, rows, items, scores, start=0) -> StageResult:
        lim = self.limits()
        kept, decisions = [], []
        for row, s in zip(rows, scores):
            if not s:
                why = "no source image" if not row["sources"] else f"task {row['task']} edits the whole picture"
                decisions.append(decision(row, KEEP, why + ": judged by the dataset tails (photometric) only"))
                kept.append(row)
                continue
            reasons = []
            for score, checks in lim.items():
                for v, sign, what in checks:
                    if sign * s[score] > v:
                        reasons.append(f"target {s[score]:+.3g} {what} than source {s['reference']} outside the edit "
                                       f"(limit {sign * v:+.3g}; edit {s['edit_share']:.0%} of the picture)"
                                       if score == "exposure" else
                                       f"{score} {s[score]:+.3g}: {what} vs source {s['reference']} outside the "
                                       f"edit (limit {sign * v:+.3g})")
            verdict = DROP if reasons else KEEP
            decisions.append(decision(row, verdict, "; ".join(reasons), **s))
            if verdict == KEEP:
                kept.append(row)
        cutoffs = {score: {"low": next((-v for v, sg, _ in c if sg < 0), None),
                           "high": next((v for v, sg, _ in c if sg > 0), None)} for score, c in lim.items()}
        return StageResult(rows=kept, decisions=decisions, cutoffs=cutoffs)
