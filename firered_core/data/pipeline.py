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
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import PipelineConfig, stage_fingerprint
from .engines import LocalPool, load_scores, run_shards
from .extras import DataToolError
from .files import atomic_open, write_json, write_jsonl, write_text
from .report import write_index, write_stage_report
from .rows import JsonlWriter, Shards, check_input, iter_input, write_rows
from .spill import Spill
from .stages import Context, build_stage
from .stages.base import ADD, DROP

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


def run_pipeline(cfg: PipelineConfig) -> RunResult:
    """Run (or resume) every stage; return where the outputs are."""
    with LocalPool(cfg.engine.workers) as pool:
        return _run(cfg, pool)


def _read_input(cfg: PipelineConfig, work: Path) -> dict:
    """The input rows, validated, into the first work file (and the bad ones into its decisions), streaming."""
    folder = work / "read"
    done = folder / "result.json"
    if not done.exists():
        with JsonlWriter(folder / "rows.jsonl") as rows, JsonlWriter(folder / "decisions.jsonl") as bad:
            for row, b in iter_input(cfg.input):
                if row is not None:
                    rows.write([row])
                else:
                    bad.write([{"row": b["uid"], "stage": "read", "verdict": DROP, "reason": b["reason"],
                                "scores": {}}])
        write_json(done, {"keep": rows.count, "drop": bad.count})
    got = json.loads(done.read_text(encoding="utf-8"))
    log.info("%d row(s) read, %d bad", got["keep"], got["drop"])
    return {"stage": "read", "in": got["keep"] + got["drop"], "keep": got["keep"], "drop": got["drop"]}


def _run(cfg: PipelineConfig, pool: LocalPool) -> RunResult:
    ctx = Context(output=str(Path(cfg.output).resolve()), analysis_size=cfg.analysis_size)
    stages = [build_stage(s.model_dump(), ctx.__dict__) for s in cfg.stages]
    for stage in stages:  # missing optional packages are reported before any work
        stage.check()
    check_input(cfg.input)  # a bad input is refused before the output folder is written to
    out = _prepare_output(cfg)
    work = out / ".work"
    summary = [_read_input(cfg, work)]
    rows_path, parts, reports = work / "read" / "rows.jsonl", [work / "read" / "decisions.jsonl"], []
    for idx, (stage, scfg) in enumerate(zip(stages, cfg.stages)):
        sdir = work / f"{idx:02d}-{stage.name}"
        done = sdir / "result.json"
        if not done.exists():
            spec = json.dumps({"config": scfg.model_dump(), "context": ctx.__dict__}, sort_keys=True)
            _run_stage(stage, spec, rows_path, sdir, cfg, pool)
        saved = json.loads(done.read_text(encoding="utf-8"))
        report = f"{idx:02d}-{stage.name}.html"
        values = dict(np.load(sdir / "values.npz")) if (sdir / "values.npz").exists() else {}
        problems = saved.get("problems", [])
        for p in problems:
            log.error("stage %s: %s", stage.name, p)
        write_stage_report(out / "report" / report, stage.name, stage.kind, sdir / "decisions.jsonl",
                           sdir / "pics.jsonl", saved["cutoffs"], values, cfg.report, problems)
        counts = saved["counts"]
        summary.append({"stage": stage.name, "kind": stage.kind, "in": saved["in"], **counts, "report": report,
                        "images": saved["images"], "seconds": saved["seconds"],
                        **({"problems": problems} if problems else {})})
        reports.append((stage.name, report, counts))
        parts.append(sdir / "decisions.jsonl")
        rows_path = sdir / "rows.jsonl"
    size = cfg.engine.shard_size
    per_task = write_rows(Shards.of(rows_path, size), out / "data")
    negatives = [p for p in sorted(work.glob("*/negatives.jsonl")) if p.stat().st_size]
    if negatives:
        write_rows((shard for p in negatives for shard in Shards.of(p, size)), out / "negatives")
    with atomic_open(out / "decisions.jsonl", "wb") as fh:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, fh)
    write_json(out / "summary.json", {"rows_per_task": per_task, "stages": summary,
                                      "negatives": sum(_lines(p) for p in negatives)})
    write_index(out / "report" / "index.html", summary, per_task)
    return RunResult(out, per_task, summary)


def _run_stage(stage, spec: str, rows_path: Path, sdir: Path, cfg: PipelineConfig, pool: LocalPool) -> None:
    """Score (engine), fit (one pass over compact descriptors), then decide shard by shard, writing the stage's
    rows, decisions (with each row's pictures for the report) and side outputs as it goes."""
    started = time.perf_counter()
    size = cfg.engine.shard_size
    rows = Shards.of(rows_path, size)
    side = stage.side_items()
    items = rows
    if side is not None:
        write_jsonl(sdir / "items.jsonl", side)
        items = Shards.of(sdir / "items.jsonl", size)
    keys: list[str] = []
    if stage.scores_items and len(items):
        keys = run_shards(spec, items, sdir / "shards", cfg.engine, stage.uses_model, desc=stage.name, pool=pool)

    def scores(i: int, count: int) -> list[dict]:
        return load_scores(sdir / "shards", i, keys[i], count) if keys else [{} for _ in range(count)]

    def row_shards():  # (rows, scores) per shard, a fresh pass each call
        for i in range(len(rows)):
            shard = rows.read(i)
            yield shard, (scores(i, len(shard)) if side is None else [{} for _ in shard])

    stage.fit(row_shards, Spill(sdir / "spill"))
    counts = {v: 0 for v in ("keep", "drop", "fix", "add")}
    cutoffs: dict = {}
    n_in = images = 0
    outputs = ("rows", "decisions", "pics", "negatives")
    with ExitStack() as stack:
        main = {k: stack.enter_context(JsonlWriter(sdir / f"{k}.jsonl")) for k in outputs}
        # rows a stage adds while it walks the rows (inversions) follow all the rows it kept, as in one pass
        later = {k: stack.enter_context(JsonlWriter(sdir / "added" / f"{k}.jsonl")) for k in outputs[:3]}

        def emit(shard: list[dict], shard_items: list[dict], shard_scores: list[dict], start: int) -> None:
            nonlocal cutoffs
            res = stage.decide(shard, shard_items, shard_scores, start=start)
            seen = {r["uid"]: r for r in shard} | {r["uid"]: r for r in res.rows}
            defer = ({r["uid"] for r in res.rows} - {r["uid"] for r in shard}) if shard else set()
            for r in res.rows:
                (later if r["uid"] in defer else main)["rows"].write([r])
            for d in res.decisions:
                out = later if d["row"] in defer and d["verdict"] == ADD else main
                out["decisions"].write([{**d, "stage": stage.name}])
                out["pics"].write([_pictures(seen.get(d["row"]))])
                counts[d["verdict"]] = counts.get(d["verdict"], 0) + 1
            main["negatives"].write(res.extra.get("negatives", []))
            cutoffs = res.cutoffs or cutoffs

        start = 0
        for shard, shard_scores in row_shards():
            emit(shard, shard if side is None else [], shard_scores if side is None else [], start)
            start += len(shard)
            n_in += len(shard)
            if side is None and stage.scores_items:
                images += sum(len(r["sources"]) + 1 for r in shard)
        for k in outputs[:3]:
            later[k].close()
            main[k].append_file(later[k].path)
        if side is not None:
            for i in range(len(items)):
                shard_items = items.read(i)
                emit([], shard_items, scores(i, len(shard_items)), 0)
                if stage.scores_items:
                    images += sum(len(it.get("sources", [])) + 1 for it in shard_items)
    shutil.rmtree(sdir / "added")
    values = stage.report_values()
    if values:
        with atomic_open(sdir / "values.npz", "wb") as fh:
            np.savez(fh, **{k: np.asarray(v) for k, v in values.items()})
    write_json(sdir / "result.json", {"counts": counts, "cutoffs": cutoffs, "in": n_in, "images": images,
                                      "seconds": round(time.perf_counter() - started, 3),
                                      "problems": stage.problems()})


def _pictures(row: dict | None) -> dict:
    return {"sources": row["sources"][:1], "target": row["target"]} if row else {"sources": [], "target": ""}


def _lines(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(1 for _ in fh)
