"""Photometric filters: each descriptor's distribution is fitted on the data set (all images of all rows) and the
implausible tails are dropped: beyond the configured quantile AND ``fence`` robust deviations from the median."""

from __future__ import annotations

import numpy as np

from ..descriptors import LOG_FIT, RANGES, photometric
from ..imageops import downscale, load_rgb
from ..rows import row_images
from ..spill import Spill
from .base import DROP, KEEP, FittedStage, ShardPass, StageResult, decision, tail_cutoffs


class PhotometricStage(FittedStage):
    kind = "photometric"

    def score(self, row: dict) -> dict:
        out = []
        for path in row_images(row):
            arr = load_rgb(path)
            desc = photometric(downscale(arr, self.ctx.analysis_size), full=arr)
            out.append({k: v for k, v in desc.items() if k in self.cfg.descriptors})
        return {"images": out}

    def _fit(self, shards: ShardPass, spill: Spill) -> None:
        """Every image's descriptors (float64, 8 bytes each) spilled, then the quantile cut-offs fitted."""
        for _, scores in shards():
            for k in self.cfg.descriptors:
                spill.append(k, [img[k] for s in scores for img in s["images"]], np.float64)
        self.values = {k: spill.get(k, np.float64) for k in self.cfg.descriptors}
        self.cuts = {k: self._cut(k, np.asarray(self.values[k]), t) for k, t in self.cfg.descriptors.items()}
        self._problems = out_of_range(self.cuts, self.cfg.fence)

    def problems(self) -> list[str]:
        return list(getattr(self, "_problems", []))

    def report_values(self) -> dict[str, np.ndarray]:
        return self.values

    def _decide(self, rows, scores, start) -> StageResult:
        cuts = self.cuts
        kept, decisions = [], []
        for row, s in zip(rows, scores):
            names = ["source %d" % (i + 1) for i in range(len(row["sources"]))] + ["target"]
            reasons, worst = [], {}
            for k, cut in cuts.items():
                vals = [img[k] for img in s["images"]]
                for name, v in zip(names, vals):
                    if cut["low"] is not None and v < cut["low"]:
                        reasons.append(f"{k} {v:.3g} < {cut['low']:.3g} in {name}")
                    if cut["high"] is not None and v > cut["high"]:
                        reasons.append(f"{k} {v:.3g} > {cut['high']:.3g} in {name}")
                worst[k] = max(vals, key=lambda v: _excess(v, cut))
            verdict = DROP if reasons else KEEP
            decisions.append(decision(row, verdict, "; ".join(reasons), **worst))
            if verdict == KEEP:
                kept.append(row)
        return StageResult(rows=kept, decisions=decisions, cutoffs=cuts)

    def _cut(self, name: str, values: np.ndarray, tail) -> dict[str, float | None]:
        if name not in LOG_FIT:
            return tail_cutoffs(values, tail.low, tail.high, self.cfg.fence)
        cut = tail_cutoffs(np.log(values + 1e-3), tail.low, tail.high, self.cfg.fence)
        return {k: (None if v is None else float(np.exp(v) - 1e-3)) for k, v in cut.items()}


def out_of_range(cuts: dict[str, dict], fence: float) -> list[str]:
    """A fitted cut-off outside the values its descriptor can take never drops anything: say so (not a no-op)."""
    out = []
    for name, cut in cuts.items():
        lo, hi = RANGES.get(name, (None, None))
        for side, c in cut.items():
            if c is None:
                continue
            if (lo is not None and c < lo and side == "low") or (hi is not None and c > hi and side == "high"):
                span = f"{lo:g}..{hi:g}" if hi is not None else f">= {lo:g}"
                out.append(f"{name} {side} cut-off {c:.4g} is outside {span}: this tail can never drop a row here "
                           f"(the data set's spread times fence {fence:g} reaches past the range; lower "
                           f"stages.<name>.fence or rely on the pair-aware quality stage)")
    return out


def _excess(v: float, cut: dict) -> float:
    """How far beyond (positive) or inside (negative) its nearest cut-off a value lies."""
    out = -np.inf
    if cut["low"] is not None:
        out = max(out, cut["low"] - v)
    if cut["high"] is not None:
        out = max(out, v - cut["high"])
    return out
