"""Level 1 de-duplication over all rows: exact (pixel hash), then near duplicates (pHash / embeddings, kNN,
clusters), keeping the best row of each cluster; also labels each row's source cluster for balanced sampling."""

from __future__ import annotations

import hashlib

import numpy as np

from ..descriptors import hash_bytes, perceptual_hashes, sharpness_only
from ..extras import require
from ..imageops import downscale, load_rgb, pixel_hash
from ..knn import clusters, cosine_pairs, hamming_pairs
from ..rows import row_images
from ..ranking import MEASURES, defect_values, keep_reason, worse
from ..ranking import order as best_first
from ..spill import Spill
from .base import DROP, KEEP, FittedStage, ShardPass, StageResult, decision


class DedupStage(FittedStage):
    kind = "dedup"

    @property
    def uses_model(self) -> bool:  # type: ignore[override]
        return self.cfg.embedding is not None

    def check(self) -> None:
        if self.cfg.use_hashes:
            require("imagehash", f"stage '{self.name}' (use_hashes: true)")

    def _model(self):
        if not hasattr(self, "_emb"):
            from ..embeddings import EmbeddingModel

            self._emb = EmbeddingModel(self.cfg.embedding)
        return self._emb

    def score(self, row: dict) -> dict:
        out: dict = {"sha": [], "phash": [], "emb": []}
        smalls = []
        for path in row_images(row):
            arr = load_rgb(path)
            small = downscale(arr, self.ctx.analysis_size)
            smalls.append(small)
            if self.cfg.exact:
                out["sha"].append(pixel_hash(arr))
            if self.cfg.use_hashes:
                out["phash"].append(perceptual_hashes(small)["phash"])
            if self.cfg.embedding is not None:
                out["emb"].append(self._model()(small))
        target = load_rgb(row["target"])
        out["pixels"] = int(target.shape[0] * target.shape[1])
        out["sharpness"] = sharpness_only(downscale(target, self.ctx.analysis_size))
        out["defects"] = defect_values(smalls)
        return out

    def _fit(self, shards: ShardPass, spill: Spill) -> None:
        """One pass spills per row: its uid, a 64-bit hash of its images' pixel hashes, resolution, rounded
        sharpness, and per image count its packed pHashes / float32 embeddings; then exact duplicates, the kNN
        graph, clusters and each row's keeper are computed on those arrays."""
        n = 0
        for rows, scores in shards():
            spill.append_bytes("uid", [r["uid"].encode("utf-8") for r in rows])
            spill.append("sha", [_hash64(s["sha"]) for s in scores], np.uint64)
            spill.append("pixels", [s["pixels"] for s in scores], np.int64)
            spill.append("sharp", [round(s["sharpness"], 6) for s in scores], np.float64)
            for k in MEASURES:
                spill.append(f"d_{k}", [s["defects"][k] for s in scores], np.float64)
            counts = [len(s["phash"] or s["emb"]) for s in scores]
            spill.append("count", counts, np.int32)
            for count in sorted(set(counts)):
                mine = [j for j, c in enumerate(counts) if c == count]
                spill.append(f"row{count}", [n + j for j in mine], np.int64)
                if self.cfg.use_hashes:
                    spill.append(f"phash{count}", [hash_bytes(scores[j]["phash"]) for j in mine], np.uint8)
                if self.cfg.embedding is not None:
                    spill.append(f"emb{count}", [np.concatenate(scores[j]["emb"]) for j in mine], np.float32)
            n += len(rows)
        self.n, self.uids = n, spill.strings("uid")
        self.counts = spill.get("count", np.int32)
        self.groups = {c: self._load_group(spill, c) for c in map(int, np.unique(np.asarray(self.counts)))}
        sha, pixels, sharp = (np.asarray(spill.get(k)) for k in ("sha", "pixels", "sharp"))
        order = np.lexsort((np.arange(n), -sharp, -pixels))  # exact duplicates: identical, so in input order
        keeper = np.arange(n, dtype=np.int64)
        self.what = np.zeros(n, dtype=np.int8)  # 0 kept, 1 exact duplicate, 2 near duplicate
        if self.cfg.exact and n:
            _, first, inv = np.unique(sha[order], return_index=True, return_inverse=True)
            keeper[order] = order[first[inv]]
            self.what[keeper != np.arange(n)] = 1
        alive = self.what == 0
        labels = clusters(n, self._near_pairs(alive))
        self.defects = {k: np.asarray(spill.get(f"d_{k}", np.float64)) for k in MEASURES}
        self.flags = worse(self.defects, labels, alive, pixels)
        penalty = sum(f.astype(np.int64) for f in self.flags.values())
        self.pixels, self.sharp = pixels, sharp
        best = np.full(n, -1, dtype=np.int64)  # per component label: its best member (ranking.py)
        by = best_first(labels, penalty, pixels, sharp)
        firsts = by[np.r_[True, labels[by][1:] != labels[by][:-1]]] if n else by
        best[labels[firsts]] = firsts
        near = alive & (best[labels] != np.arange(n))
        keeper[near] = best[labels][near]
        self.what[near] = 2
        self.keeper = keeper
        self.sizes = np.bincount(keeper, minlength=n)
        self.source_cluster = self._source_clusters()

    def _decide(self, rows, scores, start) -> StageResult:
        decisions, kept = [], []
        for i, (row, s) in enumerate(zip(rows, scores), start=start):
            common = dict(quality_pixels=s["pixels"], quality_sharpness=s["sharpness"])
            if self.what[i]:
                best = int(self.keeper[i])
                what, extra = (("exact duplicate", {"distance": 0}) if self.what[i] == 1 else
                               ("near duplicate", {"distance": self._distance(i, best)}))
                why = "identical pictures, earlier in the input" if self.what[i] == 1 else keep_reason(
                    i, best, self.flags, self.defects, self.pixels, self.sharp)
                decisions.append(decision(row, DROP, f"{what} of {self.uids[best]} (kept: {why})", kept=self.uids[best],
                                          **extra, **common))
            else:
                kept.append({**row, "cluster": self.uids[int(self.source_cluster[i])]})
                decisions.append(decision(row, KEEP, "", cluster_size=int(self.sizes[i]), **common))
        return StageResult(rows=kept, decisions=decisions)

    def _load_group(self, sp: Spill, count: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Rows with ``count`` images, their packed pHashes and their embeddings (None when not configured)."""
        rows = np.asarray(sp.get(f"row{count}", np.int64))
        bits = sp.get(f"phash{count}", np.uint8, (8 * count,)) if self.cfg.use_hashes else None
        emb = sp.get(f"emb{count}", np.float32) if self.cfg.embedding is not None else None
        return rows, bits, emb

    def _position(self, i: int) -> tuple[int, int]:
        """Row i's image count and its index among the rows with that count."""
        count = int(self.counts[i])
        return count, int(np.searchsorted(self.groups[count][0], i))

    def _near_pairs(self, alive: np.ndarray) -> list[tuple[int, int, float]]:
        """Edges (row indices) between alive rows whose every image matches."""
        pairs = []
        k = self.cfg.neighbours
        for count, (rows, bits, emb) in self.groups.items():
            if count == 0:
                continue
            live = np.flatnonzero(alive[rows])
            if self.cfg.use_hashes:
                packed = np.asarray(bits)[live]
                for a, b, _ in hamming_pairs(packed, k, self.cfg.hash_bits * count):
                    if _max_bits(packed[a], packed[b]) <= self.cfg.hash_bits:
                        pairs.append((int(rows[live[a]]), int(rows[live[b]]), 0.0))
            if self.cfg.embedding is not None:
                vec = np.asarray(emb)[live].astype(np.float64)
                for a, b, _ in cosine_pairs(vec / np.sqrt(count), k, self.cfg.embedding.threshold - 1e-6):
                    if _min_cos(vec[a], vec[b], count) >= self.cfg.embedding.threshold:
                        pairs.append((int(rows[live[a]]), int(rows[live[b]]), 0.0))
        return pairs

    def _distance(self, i: int, j: int) -> float:
        count, pi = self._position(i)
        _, pj = self._position(j)
        _, bits, emb = self.groups[count]
        if self.cfg.use_hashes:
            return float(_max_bits(np.asarray(bits[pi]), np.asarray(bits[pj])))
        return round(1.0 - _min_cos(np.asarray(emb[pi], np.float64), np.asarray(emb[pj], np.float64), count), 6)

    def _source_clusters(self) -> np.ndarray:
        """Rows whose first image (the first source, or the target) is a near duplicate share a cluster."""
        if not self.cfg.use_hashes:
            return np.arange(self.n)
        first = np.zeros((self.n, 8), dtype=np.uint8)
        for rows, bits, _ in self.groups.values():
            first[rows] = np.asarray(bits)[:, :8]
        return clusters(self.n, hamming_pairs(first, self.cfg.neighbours, self.cfg.hash_bits))


def _hash64(hexes: list[str]) -> int:
    """A row's images' pixel hashes as one 64-bit number (exact duplicates: every image identical)."""
    return int.from_bytes(hashlib.sha256("|".join(hexes).encode()).digest()[:8], "little")


def _max_bits(a: np.ndarray, b: np.ndarray) -> int:
    """The largest per-image Hamming distance between two rows' packed 64-bit hashes."""
    return int(np.unpackbits(np.bitwise_xor(a, b).reshape(-1, 8), axis=1).sum(axis=1).max())


def _min_cos(a: np.ndarray, b: np.ndarray, count: int) -> float:
    """The smallest per-image cosine similarity between two rows' concatenated embeddings."""
    return min(_cos(x, y) for x, y in zip(np.split(a, count), np.split(b, count)))


def _cos(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-12))
