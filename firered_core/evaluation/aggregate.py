"""Per-sample results -> per-task and overall numbers, with the count each mean stands on.

Judge scores: a task's mean is over its judged samples; failures (no output, unparseable, HTTP, budget) are counted
and listed per task and, with ``failure_policy="min"``, enter the mean as the lowest score of the scale instead of
being left out. Overall = mean of the task means (REDEdit's rule), over the tasks that have one.

Two aggregations: ``mean`` (the default) keeps every digit. ``fireredteam`` repeats FireRed's evaluator
(``redbench_eval.py``) step by step, so numbers compare with its tables: each sample rounded to 2 decimals, each task
mean of those rounded to 2 decimals, overall = the plain mean of the rounded task means, and 0 when nothing scored.
"""

from __future__ import annotations

import math

from .benches import BenchSpec

FAILURE_POLICIES = ("exclude", "min")
AGGREGATIONS = ("mean", "fireredteam")
OBJECTIVE = ("face_identity", "text_accuracy", "text_placement", "text_size")  # per-sample metric fields, if measured


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def task_order(spec: BenchSpec, tasks: list[str]) -> list[str]:
    present = list(dict.fromkeys(tasks))
    if spec.tasks is None:
        return present
    return [t for t in spec.tasks if t in present] + [t for t in present if t not in spec.tasks]


def aggregate_judge(spec: BenchSpec, records: list[dict], failure_policy: str = "exclude",
                    aggregation: str = "mean") -> dict:
    if failure_policy not in FAILURE_POLICIES:
        raise ValueError(f"failure policy {failure_policy!r} is not one of {FAILURE_POLICIES}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation {aggregation!r} is not one of {AGGREGATIONS}")
    fireredteam = aggregation == "fireredteam"

    def rounded(value):  # Python's round(x, 2), as FireRed's script calls it
        return round(value, 2) if fireredteam and value is not None else value

    floor = float(spec.scale[0])
    tasks = {}
    for task in task_order(spec, [r["task"] for r in records]):
        mine = [r for r in records if r["task"] == task]
        judged = [r for r in mine if r.get("score") is not None]
        failed = [r for r in mine if r.get("score") is None]
        values = [rounded(r["score"]) for r in judged] + ([floor] * len(failed) if failure_policy == "min" else [])
        names = list(dict.fromkeys(n for r in judged for n in r["scores"]))
        tasks[task] = {"rows": len(mine), "judged": len(judged), "failures": len(failed),
                       "mean": rounded(_mean(values)),
                       "n": len(values), "criteria": {n: _mean([r["scores"].get(n) for r in judged]) for n in names},
                       "failed": [{"key": r["key"], "error": r.get("error")} for r in failed]}
    means = [t["mean"] for t in tasks.values() if t["mean"] is not None]
    overall_mean = _mean(means)
    if fireredteam and overall_mean is None:
        overall_mean = 0.0  # FireRed's script prints 0 when nothing scored; the report still says "no scores"
    overall = {"mean": overall_mean, "tasks": len(means), "rows": len(records),
               "judged": sum(t["judged"] for t in tasks.values()),
               "failures": sum(t["failures"] for t in tasks.values()),
               "tasks_without_score": [k for k, t in tasks.items() if t["mean"] is None],
               "failure_policy": failure_policy, "aggregation": aggregation}
    return {"tasks": tasks, "overall": overall}


def _metric_summary(items: list[dict]) -> dict:
    ok = [m for m in items if m.get("error") is None]
    shifts = [m["shift_px"] for m in ok]
    return {"samples": len(ok), "failures": len(items) - len(ok),
            "size_mismatches": sum(not m["size_match"] for m in ok),
            "shift_px_mean": _mean(shifts), "shift_px_max": max(shifts) if shifts else None,
            "shifted_over_1px": sum(s > 1.0 for s in shifts),
            "psnr_unedited": _mean([m["psnr_unedited"] for m in ok]),
            "ssim_unedited": _mean([m["ssim_unedited"] for m in ok]),
            **{name: _mean([m.get(name) for m in ok]) for name in OBJECTIVE},
            "face_n": sum(m.get("face_identity") is not None for m in ok),
            "text_n": sum(m.get("text_accuracy") is not None for m in ok)}


def aggregate_metrics(spec: BenchSpec, records: list[dict]) -> dict:
    tasks = {t: _metric_summary([r for r in records if r["task"] == t])
             for t in task_order(spec, [r["task"] for r in records])}
    return {"tasks": tasks, "overall": _metric_summary(records)}
