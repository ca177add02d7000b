"""Run a configured pipeline: read rows, run each stage (engine for scoring, driver for decisions), write the
filtered JSONL, ``decisions.jsonl``, side outputs and the per-stage HTML report. Resumable at shard granularity.

Output folder layout::

    data/<task>/data.jsonl      the filtered (and synthetic) rows; trains directly (paths relative to it)
    negatives/<task>/data.jsonl hard negatives (if a hard_negatives stage ran)
    synth/<stage>/...           synthetic images
    decisions.jsonl             {row, stage, verdict, reason, scores} for every row at every stage it saw
    report/index.html, report/<NN-stage>.html
    summary.json
    .work/                      resume state: shards of scores, finished stages
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .config import PipelineConfig, stage_fingerprint
from .engines import LocalPool, run_shards
from .extras import DataToolError
from .files import write_json, write_jsonl, write_text
from .report import write_index, write_stage_report
from .rows import read_rows, write_rows
from .stages import Context, build_stage
from .stages.base import DROP

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    output: Path
    rows_per_task: dict[str, int]
    summary: list[dict]

    @property
    def data(self) -> Path:
        return self.output / "data"

    @property
    def decisions(self) -> Path:
        return self.output / "decisions.jsonl"


def _prepare_output(cfg: PipelineConfig) -> Path:
    out = Path(cfg.output).resolve()
    inputs = [Path(p).resolve() for p in ([cfg.input] if isinstance(cfg.input, str) else cfg.input)]
    for root in inputs:
        if out == root or root in out.parents or out in root.parents:
            raise DataToolError(f"output {out} overlaps input {root}: inputs are read-only, choose a new folder")
    marker = out / ".work" / "fingerprint.json"
    fingerprint = stage_fingerprint(cfg)
    if marker.exists():
        if marker.read_text(encoding="utf-8") != fingerprint:
            raise DataToolError(f"output {out} holds a run of a different input or stages; choose a new output "
                                f"folder (or delete it to start over)")
    elif out.exists() and any(out.iterdir()):
        raise DataToolError(f"output {out} exists and is not a data-tools run; choose a new folder")
    write_text(marker, fingerprint)
    return out


def run_pipeline(cfg: PipelineConfig, stop_after_shards: int | None = None) -> RunResult:
    """Run (or resume) every stage; return where the outputs are. ``stop_after_shards`` is for tests only."""
    with LocalPool(cfg.engine.workers) as pool:
        return _run(cfg, pool, stop_after_shards)


def _run(cfg: PipelineConfig, pool: LocalPool, stop_after_shards: int | None) -> RunResult:
    out = _prepare_output(cfg)
    ctx = Context(output=str(out), analysis_size=cfg.analysis_size)
    stages = [build_stage(s.model_dump(), ctx.__dict__) for s in cfg.stages]
    for stage in stages:  # missing optional packages are reported before any work
        stage.check()
    rows, bad = read_rows(cfg.input)
    log.info("%d row(s) read, %d bad", len(rows), len(bad))
    all_decisions = [{"row": b["uid"], "stage": "read", "verdict": DROP, "reason": b["reason"], "scores": {}}
                     for b in bad]
    summary = [{"stage": "read", "in": len(rows) + len(bad), "keep": len(rows), "drop": len(bad)}]
    negatives: list[dict] = []
    reports = []
    for idx, (stage, scfg) in enumerate(zip(stages, cfg.stages)):
        sdir = out / ".work" / f"{idx:02d}-{stage.name}"
        done = sdir / "result.json"
        started = time.perf_counter()
        if not done.exists():
            items = stage.items(rows)
            scores = [{} for _ in items]
            if stage.scores_items and items:
                spec = json.dumps({"config": scfg.model_dump(), "context": ctx.__dict__}, sort_keys=True)
                scores = run_shards(spec, items, sdir / "shards", cfg.engine, stage.uses_model,
                                    stop_after=stop_after_shards, desc=stage.name, pool=pool)
            res = stage.decide(rows, items, scores)
            write_json(done, {"rows": res.rows, "decisions": res.decisions, "cutoffs": res.cutoffs,
                              "values": res.values, "extra": res.extra,
                              "images": sum(len(i.get("sources", [])) + 1 for i in items) if stage.scores_items else 0,
                              "seconds": round(time.perf_counter() - started, 3)})
        saved = json.loads(done.read_text(encoding="utf-8"))
        seen = {r["uid"]: r for r in rows} | {r["uid"]: r for r in saved["rows"]}
        report = f"{idx:02d}-{stage.name}.html"
        write_stage_report(out / "report" / report, stage.name, stage.kind, saved, seen, cfg.report)
        counts = {v: sum(d["verdict"] == v for d in saved["decisions"]) for v in ("keep", "drop", "fix", "add")}
        summary.append({"stage": stage.name, "kind": stage.kind, "in": len(rows), **counts, "report": report,
                        "images": saved["images"], "seconds": saved["seconds"]})
        reports.append((stage.name, report, counts))
        all_decisions += [{**d, "stage": stage.name} for d in saved["decisions"]]
        negatives += saved["extra"].get("negatives", [])
        rows = saved["rows"]
    per_task = write_rows(rows, out / "data")
    if negatives:
        write_rows(negatives, out / "negatives")
    write_jsonl(out / "decisions.jsonl", all_decisions)
    write_json(out / "summary.json", {"rows_per_task": per_task, "stages": summary,
                                      "negatives": len(negatives)})
    write_index(out / "report" / "index.html", summary, per_task)
    return RunResult(out, per_task, summary)
