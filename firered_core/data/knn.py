"""Nearest neighbours and clusters: faiss-cpu when installed, an exact numpy search otherwise (with a notice)."""

from __future__ import annotations

import logging

import numpy as np

from .extras import available

log = logging.getLogger(__name__)
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is not news
_WARNED = False


def _numpy_notice() -> None:
    global _WARNED
    if not _WARNED:
        log.warning("faiss-cpu is not installed: exact numpy neighbour search (quadratic; fine for tens of "
                    "thousands of images). pip install faiss-cpu for large sets.")
        _WARNED = True


def hamming_pairs(packed: np.ndarray, k: int, radius: int) -> list[tuple[int, int, int]]:
    """(i, j, distance) with i < j for every j among i's k nearest in Hamming distance within ``radius``.

    ``packed``: [N, B] uint8, each row B bytes of hash bits (``np.packbits`` of 0/1 vectors).
    """
    n = len(packed)
    if n < 2:
        return []
    dist, idx = _search(np.ascontiguousarray(packed, dtype=np.uint8), min(k + 1, n), inner=False)
    return _pairs(dist, idx, lambda d: d <= radius)


def cosine_pairs(vectors: np.ndarray, k: int, threshold: float) -> list[tuple[int, int, float]]:
    """(i, j, similarity) with i < j for k nearest neighbours by inner product of L2-normalised rows >= threshold."""
    n = len(vectors)
    if n < 2:
        return []
    sim, idx = _search(np.ascontiguousarray(vectors, dtype=np.float32), min(k + 1, n), inner=True)
    return _pairs(sim, idx, lambda s: s >= threshold)


def _search(x: np.ndarray, k: int, inner: bool):
    """Every row's k nearest rows: packed-bit Hamming distances, or inner products (``inner``)."""
    if not available("faiss"):
        _numpy_notice()
        return _numpy_knn(x, k, inner=inner)
    import faiss

    index = faiss.IndexFlatIP(x.shape[1]) if inner else faiss.IndexBinaryFlat(x.shape[1] * 8)
    index.add(x)
    return index.search(x, k)


def _numpy_knn(x: np.ndarray, k: int, inner: bool = False, block: int = 1024):
    dists, idxs = [], []
    for s in range(0, len(x), block):
        q = x[s:s + block]
        if inner:
            d = -(q @ x.T)
        else:
            d = np.unpackbits(q[:, None, :] ^ x[None, :, :], axis=2).sum(axis=2)
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        idxs.append(order)
        dists.append(np.take_along_axis(d, order, axis=1))
    d, i = np.concatenate(dists), np.concatenate(idxs)
    return (-d if inner else d), i


def _pairs(dist, idx, ok) -> list:
    seen = set()
    for i in range(len(idx)):
        for d, j in zip(dist[i], idx[i]):
            j = int(j)
            if j < 0 or j == i or not ok(d):
                continue
            a, b = min(i, j), max(i, j)
            seen.add((a, b, d.item() if hasattr(d, "item") else d))
    best: dict[tuple[int, int], object] = {}
    for a, b, d in sorted(seen):
        best.setdefault((a, b), d)
    return [(a, b, d) for (a, b), d in sorted(best.items())]


def clusters(n: int, pairs) -> np.ndarray:
    """Connected components (union-find over an int64 array): the smallest member index labels each cluster."""
    parent = np.arange(n, dtype=np.int64)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    for a, b, *_ in pairs:
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    while True:  # every parent is <= its child: jumping to the parent's parent ends at the smallest member
        nxt = parent[parent]
        if np.array_equal(nxt, parent):
            return parent
        parent = nxt
