"""Level 1 de-duplication over all rows: exact (pixel hash), then near duplicates (pHash / embeddings, kNN,
clusters), keeping the best row of each cluster; also labels each row's source cluster for balanced sampling."""

from __future__ import annotations

import numpy as np

from ..descriptors import hash_bits, perceptual_hashes, sharpness_only
from ..extras import require
from ..imageops import downscale, load_rgb, pixel_hash
from ..knn import clusters, cosine_pairs, hamming_pairs
from ..rows import row_images
from .base import DROP, KEEP, Stage, StageResult, decision


class DedupStage(Stage):
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
        for path in row_images(row):
            arr = load_rgb(path)
            small = downscale(arr, self.ctx.analysis_size)
            if self.cfg.exact:
                out["sha"].append(pixel_hash(arr))
            if self.cfg.use_hashes:
                out["phash"].append(perceptual_hashes(small)["phash"])
            if self.cfg.embedding is not None:
                out["emb"].append(self._model()(small))
        target = load_rgb(row["target"])
        out["pixels"] = int(target.shape[0] * target.shape[1])
        out["sharpness"] = sharpness_only(downscale(target, self.ctx.analysis_size))
        return out

    def decide(self, rows, items, scores) -> StageResult:
        n = len(rows)
        # the best first: resolution, then sharpness, then input order
        order = sorted(range(n), key=lambda i: (-scores[i]["pixels"], -round(scores[i]["sharpness"], 6), i))
        rank = {i: r for r, i in enumerate(order)}
        dropped: dict[int, tuple[int, str, dict]] = {}
        if self.cfg.exact:
            first: dict[tuple, int] = {}
            for i in order:
                key = tuple(scores[i]["sha"])
                if key in first:
                    dropped[i] = (first[key], "exact duplicate", {"distance": 0})
                else:
                    first[key] = i
        alive = [i for i in range(n) if i not in dropped]
        pairs = self._near_pairs(alive, scores)
        labels = clusters(len(alive), pairs)
        members: dict[int, list[int]] = {}
        for a, lab in zip(alive, labels):
            members.setdefault(lab, []).append(a)
        for group in members.values():
            best = min(group, key=rank.__getitem__)
            for i in group:
                if i != best:
                    dropped[i] = (best, "near duplicate", {"distance": self._distance(scores[i], scores[best])})
        source_cluster = self._source_clusters(scores)
        decisions, kept, sizes = [], [], {}
        for i in range(n):
            keeper = dropped[i][0] if i in dropped else i
            sizes[keeper] = sizes.get(keeper, 0) + 1
        for i, row in enumerate(rows):
            s = scores[i]
            common = dict(quality_pixels=s["pixels"], quality_sharpness=s["sharpness"])
            if i in dropped:
                best, what, extra = dropped[i]
                decisions.append(decision(row, DROP, f"{what} of {rows[best]['uid']}", **extra, **common))
            else:
                kept.append({**row, "cluster": rows[source_cluster[i]]["uid"]})
                decisions.append(decision(row, KEEP, "", cluster_size=sizes.get(i, 1), **common))
        return StageResult(rows=kept, decisions=decisions)

    def _near_pairs(self, alive: list[int], scores: list[dict]) -> list[tuple[int, int, float]]:
        """Edges between alive rows (indices into ``alive``) whose every image matches."""
        pairs = []
        by_len: dict[int, list[int]] = {}
        for pos, i in enumerate(alive):
            by_len.setdefault(len(scores[i]["phash"] or scores[i]["emb"]), []).append(pos)
        k = self.cfg.neighbours
        for count, positions in by_len.items():
            if count == 0:
                continue
            if self.cfg.use_hashes:
                bits = np.stack([hash_bits(scores[alive[p]]["phash"]) for p in positions])
                for a, b, _ in hamming_pairs(bits, k, self.cfg.hash_bits * count):
                    sa, sb = scores[alive[positions[a]]], scores[alive[positions[b]]]
                    if self._max_bits(sa, sb) <= self.cfg.hash_bits:
                        pairs.append((positions[a], positions[b], 0.0))
            if self.cfg.embedding is not None:
                vec = np.stack([np.concatenate(scores[alive[p]]["emb"]) / np.sqrt(count) for p in positions])
                for a, b, _ in cosine_pairs(vec, k, self.cfg.embedding.threshold - 1e-6):
                    sa, sb = scores[alive[positions[a]]], scores[alive[positions[b]]]
                    if min(_cos(x, y) for x, y in zip(sa["emb"], sb["emb"])) >= self.cfg.embedding.threshold:
                        pairs.append((positions[a], positions[b], 0.0))
        return pairs

    @staticmethod
    def _max_bits(a: dict, b: dict) -> int:
        return max(int((hash_bits([x]) != hash_bits([y])).sum()) for x, y in zip(a["phash"], b["phash"]))

    def _distance(self, a: dict, b: dict) -> float:
        if self.cfg.use_hashes:
            return float(self._max_bits(a, b))
        return round(1.0 - min(_cos(x, y) for x, y in zip(a["emb"], b["emb"])), 6)

    def _source_clusters(self, scores: list[dict]) -> list[int]:
        """Rows whose first image (the first source, or the target) is a near duplicate share a cluster."""
        if not self.cfg.use_hashes:
            return list(range(len(scores)))
        bits = np.stack([hash_bits(s["phash"][:1]) for s in scores])
        return clusters(len(scores), hamming_pairs(bits, self.cfg.neighbours, self.cfg.hash_bits))


def _cos(x: list[float], y: list[float]) -> float:
    return float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-12))
