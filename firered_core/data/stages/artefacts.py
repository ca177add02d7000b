"""Artefact stage: a row is dropped when any of its images shows overlay text, a mosaic, a collage or a code."""

from __future__ import annotations

from ..artefacts import code_score, collage_score, mosaic_score, text_score
from ..extras import require
from ..imageops import downscale, load_rgb
from ..rows import row_images
from .base import DROP, KEEP, Stage, StageResult, decision


class ArtefactStage(Stage):
    kind = "artefacts"

    def check(self) -> None:
        if self.cfg.text is not None or self.cfg.codes:
            require("cv2", f"stage '{self.name}' (text / codes; set text: null and codes: false to run without)")

    def score(self, row: dict) -> dict:
        out = {}
        for path in row_images(row):
            arr = load_rgb(path)
            small = downscale(arr, self.ctx.analysis_size)
            got = {}
            if self.cfg.text is not None:
                got["text"] = text_score(small)
            if self.cfg.mosaic is not None:
                got["mosaic"] = mosaic_score(arr)
            if self.cfg.collage is not None:
                got["collage"] = collage_score(small)
            if self.cfg.codes:
                got["codes"] = code_score(small)
            for k, v in got.items():
                out[k] = max(out.get(k, 0.0), v)
        return out

    def limits(self) -> dict[str, float]:
        lim = {k: getattr(self.cfg, k) for k in ("text", "mosaic", "collage") if getattr(self.cfg, k) is not None}
        if self.cfg.codes:
            lim["codes"] = 0.5
        return lim

    def decide(self, rows, items, scores, start=0) -> StageResult:
        lim = self.limits()
        kept, decisions = [], []
        for row, s in zip(rows, scores):
            hits = [f"{k} {s[k]:.3g} >= {v:.3g}" for k, v in lim.items() if s.get(k, 0.0) >= v]
            verdict = DROP if hits else KEEP
            decisions.append(decision(row, verdict, "; ".join(hits), **s))
            if verdict == KEEP:
                kept.append(row)
        return StageResult(rows=kept, decisions=decisions,
                           cutoffs={k: {"low": None, "high": v} for k, v in lim.items()})
