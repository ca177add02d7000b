"""Artefact stage: a row is dropped when any of its images shows a mosaic or a code, or its target shows overlay text
or a collage border (in a pair: strokes and borders its first source does not have, so a photograph's own texture,
signage, horizon and frame do not count). Text,
mosaic and codes are looked for in parts of the picture (text-line blobs, windows, the detector's quadrilateral);
the decision says where: ``boxes`` lists [image, x0, y0, x1, y1, what] with coordinates as fractions of the
picture, drawn on the report's thumbnails."""

from __future__ import annotations

from ..artefacts import code_find, collage_score, mosaic_find, text_find
from ..extras import require
from ..imageops import downscale, load_rgb, resize_to
from ..rows import row_images
from .base import DROP, KEEP, Stage, StageResult, decision


def _frac(box, shape) -> list[float]:
    h, w = shape[:2]
    x0, y0, x1, y1 = box
    return [round(x0 / w, 4), round(y0 / h, 4), round(x1 / w, 4), round(y1 / h, 4)]


class ArtefactStage(Stage):
    kind = "artefacts"

    def check(self) -> None:
        if self.cfg.text is not None or self.cfg.codes:
            require("cv2", f"stage '{self.name}' (text / codes; set text: null and codes: false to run without)")

    def score(self, row: dict) -> dict:
        out: dict = {}
        where: dict[str, list] = {}
        names = [f"source {i + 1}" for i in range(len(row["sources"]))] + ["target"]
        for name, path in zip(names, row_images(row)):
            arr = load_rgb(path)
            small = downscale(arr, self.ctx.analysis_size)
            got = {}
            ref = None  # paired target: text strokes / borders the first source lacks
            if name == "target" and row["sources"]:
                ref = resize_to(downscale(load_rgb(row["sources"][0]), self.ctx.analysis_size),
                                (small.shape[1], small.shape[0]))
            if self.cfg.text is not None and name == "target":
                got["text"] = (*text_find(small, ref), small.shape)
            if self.cfg.mosaic is not None:
                got["mosaic"] = (*mosaic_find(arr), arr.shape)
            if self.cfg.collage is not None and name == "target":  # in a pair: against the source
                got["collage"] = (collage_score(small, ref=ref), None, None)
            if self.cfg.codes:
                got["codes"] = (*code_find(small), small.shape)
            for k, (v, box, shape) in got.items():
                if v > out.get(k, 0.0) or k not in out:
                    out[k] = v
                    if box is not None:
                        where[k] = [name, *_frac(box, shape), k]
        out["where"] = where
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
            s = dict(s)
            where = s.pop("where", {})
            hit = [k for k, v in lim.items() if s.get(k, 0.0) >= v]
            reasons = [f"{k} {s[k]:.3g} >= {lim[k]:.3g}" + (f" in {where[k][0]} at {where[k][1:5]}" if k in where
                                                           else "") for k in hit]
            boxes = [where[k] for k in hit if k in where]
            verdict = DROP if hit else KEEP
            extra = {"boxes": boxes} if boxes else {}
            decisions.append(decision(row, verdict, "; ".join(reasons), **s, **extra))
            if verdict == KEEP:
                kept.append(row)
        return StageResult(rows=kept, decisions=decisions,
                           cutoffs={k: {"low": None, "high": v} for k, v in lim.items()})
