"""Stratified, balanced sampling: quotas by task (mixture shares), then equal shares per source count, filled
round-robin over de-dup clusters so no single picture dominates; strata short of their quota hand the rest on."""

from __future__ import annotations

from ..extras import DataToolError
from .base import DROP, KEEP, Stage, StageResult, decision, seeded_rng


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


class SampleStage(Stage):
    kind = "sample"
    scores_items = False

    def decide(self, rows, items, scores) -> StageResult:
        cfg = self.cfg
        if cfg.mixture and "task" not in cfg.by:
            raise DataToolError(f"stage '{self.name}': mixture needs 'task' in by")
        tasks = sorted({r["task"] for r in rows})
        weights = {t: 1.0 for t in tasks} if not cfg.mixture else {t: float(cfg.mixture.get(t, 0.0)) for t in tasks}
        unknown = set(cfg.mixture or {}) - set(tasks)
        if unknown:
            raise DataToolError(f"stage '{self.name}': mixture names task(s) {sorted(unknown)} not in the data "
                                f"(tasks: {tasks})")
        strata: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            key = (r["task"] if "task" in cfg.by else "*", len(r["sources"]) if "sources" in cfg.by else "*")
            strata.setdefault(key, []).append(i)
        by_task: dict[str, list[tuple]] = {}
        for key in strata:
            by_task.setdefault(key[0], []).append(key)
        task_caps = {t: sum(len(strata[k]) for k in keys) for t, keys in by_task.items()}
        task_w = {t: (sum(weights[x] for x in tasks) if t == "*" else weights[t]) for t in by_task}
        total = cfg.target if cfg.target is not None else sum(task_caps.values())
        task_quota = allocate(total, task_caps, task_w)
        chosen: set[int] = set()
        for t, keys in by_task.items():
            quota = allocate(task_quota[t], {k: len(strata[k]) for k in keys}, {k: 1.0 for k in keys})
            for key in keys:
                chosen.update(self._round_robin(rows, strata[key], quota[key], key))
        kept, decisions = [], []
        for i, row in enumerate(rows):
            stratum = f"task={row['task']}, sources={len(row['sources'])}"
            if i in chosen:
                kept.append(row)
                decisions.append(decision(row, KEEP, f"sampled ({stratum})"))
            else:
                decisions.append(decision(row, DROP, f"not sampled ({stratum} reached its quota)"))
        return StageResult(rows=kept, decisions=decisions)

    def _round_robin(self, rows, members: list[int], n: int, key: tuple) -> list[int]:
        """One row per cluster per round, clusters and rows in a seeded order."""
        rng = seeded_rng(self.cfg.seed, repr(key))
        groups: dict[str, list[int]] = {}
        for i in members:
            c = rows[i].get("cluster", rows[i]["uid"]) if "cluster" in self.cfg.by else rows[i]["uid"]
            groups.setdefault(c, []).append(i)
        names = sorted(groups)
        order = [names[j] for j in rng.permutation(len(names))]
        queues = [[groups[c][j] for j in rng.permutation(len(groups[c]))] for c in order]
        out: list[int] = []
        while len(out) < n and any(queues):
            for q in queues:
                if q and len(out) < n:
                    out.append(q.pop(0))
        return out
