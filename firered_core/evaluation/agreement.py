"""Does the judge agree with the objective metrics? Spearman's rank correlation, per task and over all samples.

For each metric (face identity, text accuracy, unedited-region SSIM), the samples that have both a judge score and
the metric are ranked on each (ties get their average rank) and the Pearson correlation of the ranks is reported with
the count it stands on: near +1 the judge orders the samples as the metric does; near 0 or below, the judge is not
seeing what the metric measures (or the metric misses what the judge sees), and the samples are worth a look.
Fewer than 3 pairs, or a constant side, gives None.
"""

from __future__ import annotations

import math

AGREEMENT_METRICS = ("face_identity", "text_accuracy", "ssim_unedited")
MIN_PAIRS = 3


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rho (Pearson of the ranks); None below :data:`MIN_PAIRS` pairs or when a side is constant."""
    if len(x) != len(y) or len(x) < MIN_PAIRS:
        return None
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def _pairs(samples: list[dict], metric: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for s in samples:
        value = (s.get("metrics") or {}).get(metric)
        if s.get("score") is not None and value is not None and math.isfinite(value):
            xs.append(float(s["score"]))
            ys.append(float(value))
    return xs, ys


def judge_vs_metrics(samples: list[dict], tasks: list[str]) -> dict:
    """``{"tasks": {task: {metric: {"rho", "n"}}}, "all": {metric: {"rho", "n"}}}`` for the metrics measured."""
    def block(group: list[dict]) -> dict:
        out = {}
        for metric in AGREEMENT_METRICS:
            xs, ys = _pairs(group, metric)
            if xs:
                out[metric] = {"rho": spearman(xs, ys), "n": len(xs)}
        return out

    per_task = {t: block([s for s in samples if s["task"] == t]) for t in tasks}
    return {"tasks": {t: b for t, b in per_task.items() if b}, "all": block(samples)}
