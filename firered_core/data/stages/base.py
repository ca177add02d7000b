"""What every stage is: score items (in workers: pure, per item), then decide (on the driver), shard by shard.

Stages whose decisions depend on the whole data set (de-duplication, photometric quantiles, sampling quotas) first
``fit`` on one streaming pass over all shards, keeping only compact per-row descriptors in a :class:`Spill`; then
``decide`` runs per shard with ``start``, the global index of the shard's first row. Called alone on rows in
memory, ``decide`` fits on those rows first (unit tests, evaluation).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterable

import numpy as np

from ..spill import Spill

KEEP, DROP, FIX, ADD = "keep", "drop", "fix", "add"


@dataclass(frozen=True)
class Context:
    """What a stage needs besides its config; travels to workers as JSON."""

    output: str
    analysis_size: int = 512

    @property
    def out(self) -> Path:
        return Path(self.output)


@dataclass
class StageResult:
    rows: list[dict]  # the rows the next stage sees (kept, fixed and added)
    decisions: list[dict]  # {"row", "verdict", "reason", "scores"} per row (and per added row)
    cutoffs: dict[str, dict[str, float | None]] = field(default_factory=dict)  # score -> {"low", "high"}
    extra: dict[str, list[dict]] = field(default_factory=dict)  # side outputs: "negatives" rows


def decision(row: dict, verdict: str, reason: str = "", **scores) -> dict:
    return {"row": row["uid"], "verdict": verdict, "reason": reason,
            "scores": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in scores.items()}}


ShardPass = Callable[[], Iterable[tuple[list[dict], list[dict]]]]  # a fresh pass of (rows, scores) per shard


class Stage:
    """Base: the items scored are the rows unless ``side_items`` gives something else (mask records)."""

    kind: ClassVar[str] = ""
    uses_model: ClassVar[bool] = False  # Ray runs it in an actor pool (GPUs when configured)
    scores_items: ClassVar[bool] = True  # False: decide() alone (text-only or global stages)

    def __init__(self, cfg, ctx: Context):
        self.cfg = cfg
        self.ctx = ctx

    @property
    def name(self) -> str:
        return self.cfg.name

    def check(self) -> None:
        """Raise MissingExtra before any work when a configured descriptor's package is absent."""

    def side_items(self) -> list[dict] | None:
        """Items to score instead of the rows (None: the rows). Their decisions follow the rows'."""
        return None

    def score(self, item: dict) -> dict:
        return {}

    def fit(self, shards: ShardPass, spill: Spill) -> None:
        """Dataset-level statistics from one pass over every shard (stages that need them)."""

    def problems(self) -> list[str]:
        """What is wrong with the stage's fitted settings on this data set (shown in red in the report)."""
        return []

    def report_values(self) -> dict[str, np.ndarray]:
        """Every measured value of the scores the fit saw (report histograms); others come from the decisions."""
        return {}

    def decide(self, rows: list[dict], items: list[dict], scores: list[dict], start: int = 0) -> StageResult:
        raise NotImplementedError


class FittedStage(Stage):
    """A stage whose decisions need :meth:`fit` first; ``decide`` on rows in memory fits on them."""

    fitted = False

    def fit(self, shards: ShardPass, spill: Spill) -> None:
        self.fitted = True
        self._fit(shards, spill)

    def _fit(self, shards: ShardPass, spill: Spill) -> None:
        raise NotImplementedError

    def decide(self, rows: list[dict], items: list[dict], scores: list[dict], start: int = 0) -> StageResult:
        if not self.fitted:
            self.fit(lambda: [(rows, scores)], Spill())
        return self._decide(rows, scores, start)

    def _decide(self, rows: list[dict], scores: list[dict], start: int) -> StageResult:
        raise NotImplementedError


def seeded_rng(seed: int, key: str) -> np.random.Generator:
    """A generator that depends only on (seed, key): the same choices in every process and engine."""
    return np.random.default_rng(int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16))


def keep_all(rows: list[dict], reason: str = "") -> list[dict]:
    return [decision(r, KEEP, reason) for r in rows]


def tail_cutoffs(values: np.ndarray, low: float | None, high: float | None, fence: float) -> dict[str, float | None]:
    """Cut-offs beyond both the quantile and ``fence`` robust deviations (see PhotometricConfig)."""
    med = float(np.median(values))
    spread = 1.4826 * float(np.median(np.abs(values - med)))
    out: dict[str, float | None] = {"low": None, "high": None}
    if low is not None and len(values):
        out["low"] = min(float(np.quantile(values, low)), med - fence * spread)
    if high is not None and len(values):
        out["high"] = max(float(np.quantile(values, 1 - high)), med + fence * spread)
    return out
