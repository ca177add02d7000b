"""Levels 2 and 3 of de-duplication, per pair: trivial edits (the target is a source) and unrelated pairs (the
target shares nothing with any source; global-edit tasks are exempt). Level 2 uses hashes (cheap, coarse); level 3
re-checks the survivors with PSNR + SSIM + pHash distance."""

from __future__ import annotations

from ..descriptors import hamming, local_change, perceptual_hashes, psnr_ssim, thumb_diff
from ..extras import require
from ..imageops import downscale, load_rgb
from .base import DROP, KEEP, Stage, StageResult, decision


def _small(ctx, path: str):
    return downscale(load_rgb(path), ctx.analysis_size)


class PairCheckStage(Stage):
    kind = "pair_check"

    def check(self) -> None:
        require("imagehash", f"stage '{self.name}'")

    def score(self, row: dict) -> dict:
        if not row["sources"]:
            return {}
        target = _small(self.ctx, row["target"])
        t = perceptual_hashes(target)
        trivial, thumb, related = 128, 255.0, 64
        for src in row["sources"]:
            arr = _small(self.ctx, src)
            s = perceptual_hashes(arr)
            p, d = hamming(t["phash"], s["phash"]), hamming(t["dhash"], s["dhash"])
            trivial, related = min(trivial, max(p, d)), min(related, p)
            thumb = min(thumb, thumb_diff(target, arr))
        return {"trivial_bits": trivial, "thumb_diff": thumb, "related_bits": related}

    def decide(self, rows, items, scores) -> StageResult:
        cfg = self.cfg
        kept, decisions = [], []
        for row, s in zip(rows, scores):
            if not s:
                verdict, reason = KEEP, "no source image"
            elif s["trivial_bits"] <= cfg.trivial_bits and s["thumb_diff"] <= cfg.trivial_thumb:
                verdict, reason = DROP, (f"trivial edit: target within {s['trivial_bits']} hash bits and "
                                         f"{s['thumb_diff']:.0f} thumbnail levels of a source")
            elif row["task"] not in cfg.global_tasks and s["related_bits"] >= cfg.unrelated_bits:
                verdict, reason = DROP, f"unrelated pair: target {s['related_bits']} pHash bits from every source"
            else:
                verdict, reason = KEEP, ""
            decisions.append(decision(row, verdict, reason, **s))
            if verdict == KEEP:
                kept.append(row)
        cutoffs = {"trivial_bits": {"low": cfg.trivial_bits + 0.5, "high": None},
                   "thumb_diff": {"low": cfg.trivial_thumb, "high": None},
                   "related_bits": {"low": None, "high": cfg.unrelated_bits - 0.5}}
        return StageResult(rows=kept, decisions=decisions, cutoffs=cutoffs)


class FineCheckStage(Stage):
    kind = "fine_check"

    def check(self) -> None:
        require("imagehash", f"stage '{self.name}'")

    def score(self, row: dict) -> dict:
        if not row["sources"]:
            return {}
        target = _small(self.ctx, row["target"])
        th = perceptual_hashes(target)["phash"]
        best = {"local": 255.0, "psnr": 0.0, "ssim": -1.0, "bits": 64}
        for src in row["sources"]:
            arr = _small(self.ctx, src)
            psnr, ssim = psnr_ssim(target, arr)
            bits = hamming(th, perceptual_hashes(arr)["phash"])
            best = {"local": min(best["local"], local_change(target, arr)), "psnr": max(best["psnr"], psnr),
                    "ssim": max(best["ssim"], ssim), "bits": min(best["bits"], bits)}
        return best

    def decide(self, rows, items, scores) -> StageResult:
        cfg = self.cfg
        kept, decisions = [], []
        for row, s in zip(rows, scores):
            if not s:
                verdict, reason = KEEP, "no source image"
            elif s["local"] <= cfg.trivial_local or (s["psnr"] >= cfg.trivial_psnr and s["ssim"] >= cfg.trivial_ssim):
                verdict, reason = DROP, (f"trivial edit: largest patch change {s['local']:.1f}, PSNR {s['psnr']:.1f} "
                                         f"dB, SSIM {s['ssim']:.3f} to a source")
            elif (row["task"] not in cfg.global_tasks and s["ssim"] < cfg.unrelated_ssim
                  and s["bits"] >= cfg.unrelated_bits):
                verdict, reason = DROP, f"unrelated pair: SSIM {s['ssim']:.3f}, {s['bits']} pHash bits"
            else:
                verdict, reason = KEEP, ""
            decisions.append(decision(row, verdict, reason, **s))
            if verdict == KEEP:
                kept.append(row)
        cutoffs = {"local": {"low": cfg.trivial_local, "high": None}, "psnr": {"low": None, "high": cfg.trivial_psnr}, "ssim": {"low": cfg.unrelated_ssim,
                                                                             "high": cfg.trivial_ssim},
                   "bits": {"low": None, "high": float(cfg.unrelated_bits)}}
        return StageResult(rows=kept, decisions=decisions, cutoffs=cutoffs)
