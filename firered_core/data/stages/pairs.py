"""Levels 2 and 3 of de-duplication, per pair: trivial edits (the target is a source) and unrelated pairs (the
target shares nothing with any source; global-edit tasks are exempt). Level 2 uses hashes and thumbnails (cheap,
coarse); level 3 re-checks the survivors with patch change, PSNR, SSIM and pHash distance. A row's score is its
target against its closest source."""

from __future__ import annotations

import numpy as np

from ..descriptors import hamming, local_change, perceptual_hashes, psnr_ssim, thumb_diff
from ..extras import require
from ..imageops import downscale, load_rgb, resize_to
from .base import DROP, KEEP, Stage, StageResult, decision


class _PairStage(Stage):
    def check(self) -> None:
        require("imagehash", f"stage '{self.name}'")

    def score(self, row: dict) -> dict:
        if not row["sources"]:
            return {}
        small = [downscale(load_rgb(p), self.ctx.analysis_size) for p in [row["target"], *row["sources"]]]
        return self.compare(small[0], small[1:])

    def compare(self, target: np.ndarray, sources: list[np.ndarray]) -> dict:
        raise NotImplementedError

    def verdict(self, row: dict, s: dict) -> tuple[str, str]:
        raise NotImplementedError

    def cutoffs(self) -> dict:
        raise NotImplementedError

    def decide(self, rows, items, scores, start=0) -> StageResult:
        kept, decisions = [], []
        for row, s in zip(rows, scores):
            verdict, reason = self.verdict(row, s) if s else (KEEP, "no source image")
            decisions.append(decision(row, verdict, reason, **s))
            if verdict == KEEP:
                kept.append(row)
        return StageResult(rows=kept, decisions=decisions, cutoffs=self.cutoffs())


class PairCheckStage(_PairStage):
    kind = "pair_check"

    @property
    def uses_model(self) -> bool:  # type: ignore[override]
        return self.cfg.embedding is not None

    def compare(self, target, sources) -> dict:
        t = perceptual_hashes(target)
        trivial, thumb, related, ssim, cos = 128, 255.0, 64, -1.0, -1.0
        small_t = resize_to(target, (64, 64))
        for arr in sources:
            s = perceptual_hashes(arr)
            p, d = hamming(t["phash"], s["phash"]), hamming(t["dhash"], s["dhash"])
            trivial, related = min(trivial, max(p, d)), min(related, p)
            thumb = min(thumb, thumb_diff(target, arr))
            ssim = max(ssim, psnr_ssim(small_t, resize_to(arr, (64, 64)))[1])
            if self.cfg.embedding is not None:
                cos = max(cos, float(np.dot(self._model()(target), self._model()(arr))))
        out = {"trivial_bits": trivial, "thumb_diff": thumb, "related_bits": related, "thumb_ssim": ssim}
        return {**out, "cosine": cos} if self.cfg.embedding is not None else out

    def _model(self):
        if not hasattr(self, "_emb"):
            from ..embeddings import EmbeddingModel

            self._emb = EmbeddingModel(self.cfg.embedding)
        return self._emb

    def verdict(self, row, s) -> tuple[str, str]:
        cfg = self.cfg
        emb = cfg.embedding
        if (s["trivial_bits"] <= cfg.trivial_bits and s["thumb_diff"] <= cfg.trivial_thumb
                and s["thumb_ssim"] >= cfg.trivial_ssim and (emb is None or s["cosine"] >= emb.threshold)):
            return DROP, (f"trivial edit: target within {s['trivial_bits']} hash bits, {s['thumb_diff']:.0f} "
                          f"thumbnail levels and SSIM {s['thumb_ssim']:.3f} of a source")
        if (row["task"] not in cfg.global_tasks and s["related_bits"] >= cfg.unrelated_bits
                and s["thumb_ssim"] < cfg.unrelated_ssim and (emb is None or s["cosine"] < emb.threshold)):
            return DROP, (f"unrelated pair: target {s['related_bits']} pHash bits and SSIM {s['thumb_ssim']:.3f} "
                          f"from every source" + ("" if emb is None else f", cosine {s['cosine']:.3f}"))
        return KEEP, ""

    def cutoffs(self) -> dict:
        cfg = self.cfg
        return {"trivial_bits": {"low": cfg.trivial_bits + 0.5, "high": None},
                "thumb_diff": {"low": cfg.trivial_thumb, "high": None},
                "related_bits": {"low": None, "high": cfg.unrelated_bits - 0.5},
                "thumb_ssim": {"low": cfg.unrelated_ssim, "high": cfg.trivial_ssim}}


class FineCheckStage(_PairStage):
    kind = "fine_check"

    def compare(self, target, sources) -> dict:
        th = perceptual_hashes(target)["phash"]
        best = {"local": 255.0, "psnr": 0.0, "ssim": -1.0, "bits": 64}
        for arr in sources:
            psnr, ssim = psnr_ssim(target, arr)
            bits = hamming(th, perceptual_hashes(arr)["phash"])
            best = {"local": min(best["local"], local_change(target, arr)), "psnr": max(best["psnr"], psnr),
                    "ssim": max(best["ssim"], ssim), "bits": min(best["bits"], bits)}
        return best

    def verdict(self, row, s) -> tuple[str, str]:
        cfg = self.cfg
        if s["local"] <= cfg.trivial_local or (s["psnr"] >= cfg.trivial_psnr and s["ssim"] >= cfg.trivial_ssim):
            return DROP, (f"trivial edit: largest patch change {s['local']:.1f}, PSNR {s['psnr']:.1f} dB, "
                          f"SSIM {s['ssim']:.3f} to a source")
        if row["task"] not in cfg.global_tasks and s["ssim"] < cfg.unrelated_ssim and s["bits"] >= cfg.unrelated_bits:
            return DROP, f"unrelated pair: SSIM {s['ssim']:.3f}, {s['bits']} pHash bits"
        return KEEP, ""

    def cutoffs(self) -> dict:
        cfg = self.cfg
        return {"local": {"low": cfg.trivial_local, "high": None}, "psnr": {"low": None, "high": cfg.trivial_psnr},
                "ssim": {"low": cfg.unrelated_ssim, "high": cfg.trivial_ssim},
                "bits": {"low": None, "high": float(cfg.unrelated_bits)}}
