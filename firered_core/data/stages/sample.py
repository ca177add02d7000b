"""Stratified, balanced sampling: quotas by task (mixture shares), then equal shares per source count, filled
round-robin over de-dup clusters so no single picture dominates; strata short of their quota hand the rest on."""

from __future__ import annotations

import numpy as np

from ..extras import DataToolError
from ..spill import Spill
from .base import DROP, KEEP, FittedStage, ShardPass, StageResult, decision, seeded_rng


def allocate(total: int, caps: dict, weights: dict) -> dict:
    """Split ``total`` over keys by ``weights`` without exceeding ``caps`` (water-filling; deterministic)."""
    quota = {k: 0 for k in caps}
    left = min(total, sum(c for k, c in caps.items() if weights.get(k, 0) > 0))
    while left > 0:
        open_ = [k for k in sorted(caps, key=str) if quota[k] < caps[k] and weights.get(k, 0) > 0]
        if not open_:
            break
        wsum = sum(weights[k] for k in open_)
        exact = {k: left * weights[k] / wsum for k in open_}
        give = {k: min(caps[k] - quota[k], int(exact[k])) for k in open_}
        if not sum(give.values()):  # only remainders left: one each, largest share first
            for k in sorted(open_, key=lambda k: (-exact[k], str(k)))[:left]:
                give[k] = 1
        for k, g in give.items():
            quota[k] += g
        left -= sum(give.values())
    return quota


class SampleStage(FittedStage):
    kind = "sample"
    scores_items = False

    def _fit(self, shards: ShardPass, spill: Spill) -> None:
        """Per row: its stratum (task id, source count) and its cluster name (spilled bytes); then the quotas and
        the chosen rows as one boolean per row."""
        cfg = self.cfg
        task_ids: dict[str, int] = {}
        for rows, _ in shards():
            spill.append("task", [task_ids.setdefault(r["task"], len(task_ids)) for r in rows], np.int32)
            spill.append("sources", [len(r["sources"]) for r in rows], np.int32)
            spill.append_bytes("cluster", [(r.get("cluster", r["uid"]) if "cluster" in cfg.by else r["uid"])
                                           .encode("utf-8") for r in rows])
        if cfg.mixture and "task" not in cfg.by:
            raise DataToolError(f"stage '{self.name}': mixture needs 'task' in by")
        tasks = sorted(task_ids)
        weights = {t: 1.0 for t in tasks} if not cfg.mixture else {t: float(cfg.mixture.get(t, 0.0)) for t in tasks}
        unknown = set(cfg.mixture or {}) - set(tasks)
        if unknown:
            raise DataToolError(f"stage '{self.name}': mixture names task(s) {sorted(unknown)} not in the data "
                                f"(tasks: {tasks})")
        names = {i: t for t, i in task_ids.items()}
        task_col = np.asarray(spill.get("task", np.int32)) if "task" in cfg.by else None
        src_col = np.asarray(spill.get("sources", np.int32)) if "sources" in cfg.by else None
        n = spill.rows("task")
        code = np.zeros(n, dtype=np.int64)  # one integer per stratum
        if task_col is not None:
            code += task_col.astype(np.int64) * (1 << 32)
        if src_col is not None:
            code += src_col
        strata: dict[tuple, np.ndarray] = {}
        for c in np.unique(code):
            members = np.flatnonzero(code == c)
            first = int(members[0])
            key = (names[int(task_col[first])] if task_col is not None else "*",
                   int(src_col[first]) if src_col is not None else "*")
            strata[key] = members
        by_task: dict[str, list[tuple]] = {}
        for key in strata:
            by_task.setdefault(key[0], []).append(key)
        task_caps = {t: sum(len(strata[k]) for k in keys) for t, keys in by_task.items()}
        task_w = {t: (sum(weights[x] for x in tasks) if t == "*" else weights[t]) for t in by_task}
        total = cfg.target if cfg.target is not None else sum(task_caps.values())
        task_quota = allocate(total, task_caps, task_w)
        ranks = spill.strings("cluster").ranks()
        self.chosen = np.zeros(n, dtype=bool)
        for t, keys in by_task.items():
            quota = allocate(task_quota[t], {k: len(strata[k]) for k in keys}, {k: 1.0 for k in keys})
            for key in keys:
                self.chosen[self._round_robin(ranks, strata[key], quota[key], key)] = True

    def _decide(self, rows, scores, start) -> StageResult:
        kept, decisions = [], []
        for i, row in enumerate(rows, start=start):
            stratum = f"task={row['task']}, sources={len(row['sources'])}"
            if self.chosen[i]:
                kept.append(row)
                decisions.append(decision(row, KEEP, f"sampled ({stratum})"))
            else:
                decisions.append(decision(row, DROP, f"not sampled ({stratum} reached its quota)"))
        return StageResult(rows=kept, decisions=decisions)

    def _round_robin(self, ranks: np.ndarray, members: np.ndarray, n: int, key: tuple) -> np.ndarray:
        """One row per cluster per round, clusters (in a seeded order of their names) and each cluster's rows in a
        seeded order: row j of the cluster at position p is taken in round j, after positions < p."""
        rng = seeded_rng(self.cfg.seed, repr(key))
        by_name = np.argsort(ranks[members], kind="stable")  # members grouped by cluster name, row order within
        rows, names = members[by_name], ranks[members][by_name]
        starts = np.flatnonzero(np.r_[True, names[1:] != names[:-1]]) if len(rows) else np.zeros(0, np.int64)
        ends = np.r_[starts[1:], len(rows)]
        picked, rounds, slots = (np.empty(len(rows), dtype=np.int64) for _ in range(3))
        for slot, g in enumerate(rng.permutation(len(starts))):
            a, b = int(starts[g]), int(ends[g])
            picked[a:b] = rows[a:b][rng.permutation(b - a)]
            rounds[a:b] = np.arange(b - a)
            slots[a:b] = slot
        return picked[np.lexsort((slots, rounds))[:n]]
