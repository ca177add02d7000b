"""Aspect-ratio buckets and a weighted, resumable, rank-consistent batch sampler.

Every step draws one *global* batch (``batch_size x world_size`` rows) from a single bucket; rank ``r`` trains on
slice ``r`` of it. All decisions (source count, task, bucket, rows) come from RNGs seeded by ``(seed, step)`` and
per-bucket cursors that evolve identically on every rank, so ranks agree without communicating, a 2-process run sees
the same rows as a 1-process run with twice the batch, and a resumed run continues exactly.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from ..geometry import calculate_dimensions
from .checkpoint import CheckpointError
from .data import DataError, Sample

MIN_RATIO, MAX_RATIO = 0.25, 4.0

BucketKey = tuple  # (task, n_sources, (source ratio bins...), target ratio bin)


def ratio_bin(width: int, height: int) -> float:
    """width / height rounded to 0.1 and kept within [1/4, 4]."""
    r = min(max(width / height, MIN_RATIO), MAX_RATIO)
    return min(max(round(r * 10) / 10, MIN_RATIO), MAX_RATIO)


def bucket_key(sample: Sample) -> BucketKey:
    return (sample.task, len(sample.sources), tuple(ratio_bin(*s) for s in sample.source_sizes),
            ratio_bin(*sample.target_size))


def key_name(key: BucketKey) -> str:
    task, n, src, tgt = key
    return f"{task}|{n}|{','.join(f'{r:.2f}' for r in src)}|{tgt:.2f}"


def bucket_sizes(key: BucketKey, target_area: float, reference_area: float, multiple: int = 32
                 ) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """Training (width, height) of the target and of each reference for a bucket."""
    _, _, src, tgt = key
    return (calculate_dimensions(target_area, tgt, multiple),
            [calculate_dimensions(reference_area, r, multiple) for r in src])


@dataclass(frozen=True)
class Batch:
    step: int
    key: BucketKey
    indices: tuple[int, ...]  # the global batch, rank-major

    def for_rank(self, rank: int, world_size: int) -> tuple[int, ...]:
        per = len(self.indices) // world_size
        return self.indices[rank * per:(rank + 1) * per]

    def global_positions(self, rank: int, world_size: int) -> range:
        """Positions of this rank's rows in the global batch (seed per-row noise / timesteps with these)."""
        per = len(self.indices) // world_size
        return range(rank * per, (rank + 1) * per)


class BucketSampler:
    """Weighted bucket sampling. ``task_weights`` scale each task's rows (unlisted tasks weigh 1);
    ``count_weights`` give the probability of a step using n source images (unlisted counts weigh 1)."""

    def __init__(self, samples: list[Sample], batch_size: int, world_size: int = 1,
                 task_weights: dict[str, float] | None = None, count_weights: dict[int, float] | None = None,
                 seed: int = 0, repeat: int = 1):
        if batch_size < 1 or world_size < 1:
            raise ValueError("batch_size and world_size must be at least 1")
        self.batch_size, self.world_size, self.seed = batch_size, world_size, seed
        self.repeat = max(1, int(repeat))  # steps that train on the same rows (NFT: a rollout batch, several steps)
        self.last: Batch | None = None
        self.task_weights = dict(task_weights or {})
        self.count_weights = dict(count_weights or {})
        buckets: dict[BucketKey, list[int]] = {}
        for i, s in enumerate(samples):
            buckets.setdefault(bucket_key(s), []).append(i)
        self.keys = sorted(buckets, key=key_name)
        self.buckets = buckets
        self.num_samples = len(samples)
        counts = sorted({k[1] for k in self.keys})
        self._by_count = {}
        for n in (n for n in counts if self.count_weights.get(n, 1.0) > 0):
            keys = [k for k in self.keys if k[1] == n]
            w = [self.task_weights.get(k[0], 1.0) * len(buckets[k]) for k in keys]
            if sum(w) > 0:
                self._by_count[n] = (keys, self._normalise(w))
        self.counts = sorted(self._by_count)
        if not self.counts:
            raise DataError(f"the task weights {self.task_weights} and source-count weights {self.count_weights} "
                            f"leave no row to sample (counts present: {counts})")
        self._count_p = self._normalise([self.count_weights.get(n, 1.0) for n in self.counts])
        self.step = 0
        self.cursors: dict[str, list[int]] = {}

    @staticmethod
    def _normalise(w: list[float]) -> np.ndarray:
        a = np.asarray(w, dtype=np.float64)
        return a / a.sum() if a.sum() > 0 else a

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def source_count(self, step: int) -> int:
        """The number of source images at ``step``: the same on every rank (seeded by the step alone)."""
        rng = np.random.default_rng([self.seed, step, 0])
        return int(self.counts[rng.choice(len(self.counts), p=self._count_p)])

    def _pick_bucket(self, step: int) -> BucketKey:
        keys, p = self._by_count[self.source_count(step)]
        rng = np.random.default_rng([self.seed, step, 1])
        return keys[rng.choice(len(keys), p=p)]

    def _take(self, key: BucketKey, n: int) -> list[int]:
        """``n`` rows of a bucket, walking a per-epoch permutation (seeded by bucket and epoch) with a cursor."""
        members = self.buckets[key]
        name = key_name(key)
        epoch, pos = self.cursors.get(name, [0, 0])
        out = []
        while len(out) < n:
            perm = np.random.default_rng([self.seed, zlib.crc32(name.encode()), epoch]).permutation(len(members))
            take = min(n - len(out), len(members) - pos)
            out += [members[j] for j in perm[pos:pos + take]]
            pos += take
            if pos == len(members):
                epoch, pos = epoch + 1, 0
        self.cursors[name] = [epoch, pos]
        return out

    def next(self) -> Batch:
        if self.step % self.repeat and self.last is not None:  # inside a round: the round's rows again
            batch = Batch(self.step, self.last.key, self.last.indices)
        else:
            key = self._pick_bucket(self.step)
            batch = Batch(self.step, key, tuple(self._take(key, self.global_batch)))
        self.last = batch
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        return {"step": self.step, "cursors": {k: list(v) for k, v in self.cursors.items()}, "seed": self.seed,
                "num_samples": self.num_samples, "global_batch": self.global_batch,
                "last": None if self.last is None else {"key": self.last.key, "indices": list(self.last.indices)}}

    def load_state_dict(self, state: dict) -> None:
        for name in ("seed", "num_samples", "global_batch"):
            if state[name] != getattr(self, name):
                raise CheckpointError(f"sampler state has {name}={state[name]} but this run has {getattr(self, name)}: "
                                 "resume with the same data, seed, batch size and process count")
        self.step = int(state["step"])
        self.cursors = {k: [int(v[0]), int(v[1])] for k, v in state["cursors"].items()}
        last = state.get("last")
        if last is not None:  # JSON made the key's tuples lists
            task, n, bins, target = last["key"]
            self.last = Batch(self.step - 1, (task, int(n), tuple(bins), target), tuple(int(i) for i in last["indices"]))
