"""``firered-bench``: generate a bench's edits, judge them, measure them offline, report, compare.

    firered-bench generate --jsonl redbench.jsonl --out runs/base --model M [edit / speed / LoRA flags]
    firered-bench metrics  --out runs/base [--face-embedder arcface.onnx] [--ocr auto]
    firered-bench judge    --out runs/base --judge-url https://api.openai.com/v1 --judge-model gpt-4.1
                           [--aggregation fireredteam]
    firered-bench report   --out runs/base
    firered-bench report   --compare runs/base runs/int8 -o compare.html
    firered-bench run      ... (generate, metrics, judge when --judge-url is given, report)

After ``generate``, the other commands read the bench selection (bench, JSONL, root, language, tasks, limit) from
``<out>/manifest.json``; give ``--jsonl`` to judge images made elsewhere.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

from ..errors import FireRedError
from . import benches as B
from .aggregate import AGGREGATIONS
from .faces_metric import PEOPLE_TASKS
from .text_metric import TEXT_TASKS

log = logging.getLogger("firered_core.evaluation")
JUDGE = "judge.json"
METRICS = "metrics.json"


def _selection_args(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    g = p.add_argument_group("bench")
    g.add_argument("--out", required=out_required, help="run folder: <out>/<task>/<task>-<id>.png, manifest, scores")
    g.add_argument("--bench", default=None, help=f"built-in bench ({', '.join(B.BUILTIN)}) or a bench JSON file "
                                                 "(default: the run's, else redbench)")
    g.add_argument("--jsonl", help="the bench's JSONL (default: the run's manifest)")
    g.add_argument("--root", help="folder the JSONL's image paths are relative to (default: the JSONL's folder)")
    g.add_argument("--lang", choices=B.LANGS, default=None, help="instruction language (default: the bench's)")
    g.add_argument("--tasks", default=None, help="comma-separated tasks (default: all)")
    g.add_argument("--limit", type=int, default=None, help="at most this many rows per task")
    g.add_argument("--field", action="append", default=[], metavar="OURS=THEIRS",
                   help="read a field from another JSONL key, e.g. --field instruction_en=prompt (ours: id, source, "
                        "task, instruction_cn, instruction_en)")
    g.add_argument("-v", "--verbose", action="store_true")


def _judge_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("judge (any OpenAI-compatible chat-completions endpoint)")
    g.add_argument("--judge-url", help="base URL, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    g.add_argument("--judge-model", help="model name the endpoint serves")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (never logged; unset = no key sent)")
    g.add_argument("--prompts", help="judge prompts JSON, task -> template with <edit_prompt> (default: the "
                                     "bench's, e.g. <root>/prompts.json for redbench)")
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    g.add_argument("--retries", type=int, default=5, help="retries per request (default 5)")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    g.add_argument("--backoff", type=float, default=1.0, help="first retry wait in seconds, doubled each time, "
                                                             "with jitter (default 1)")
    g.add_argument("--max-backoff", type=float, default=60.0, help="longest retry wait (default 60)")
    g.add_argument("--budget", type=int, default=None, help="most HTTP requests this run may make (cached "
                                                            "replies are free)")
    g.add_argument("--cache-dir", help="judge reply cache (default <out>/judge_cache)")
    g.add_argument("--failures", choices=("exclude", "min"), default="exclude",
                   help="failed samples: left out of the means (counted and listed) or scored as the scale's "
                        "minimum (default exclude)")
    g.add_argument("--aggregation", choices=AGGREGATIONS, default="mean",
                   help="mean: unrounded means (default); fireredteam: FireRed's evaluator step by step (samples and "
                        "task means rounded to 2 decimals, overall = mean of the rounded task means, 0 when nothing "
                        "scored; the judge asked with temperature 0.1, top_p 0.95, 8192 output tokens)")


def _metric_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("offline metrics")
    g.add_argument("--masks", help="folder of edit masks laid out like the outputs (<task>/<task>-<id>.png, white = "
                                   "edited); without one the edited region is estimated")
    g.add_argument("--threshold", type=float, default=0.1,
                   help="estimated mask: mean RGB difference (0-1) above which a pixel counts as edited")
    g.add_argument("--face-embedder", help="face identity: the face embedder, a TorchScript or ONNX file or "
                                           "package.module:factory (the identity loss's; nothing is downloaded); "
                                           "unset = no face metric")
    g.add_argument("--face-detector", default="haar", help="haar (OpenCV's cascade), package.module:factory, or "
                                                           "none (the whole picture is the face) (default haar)")
    g.add_argument("--face-size", type=int, default=112, help="face crop side the embedder takes (default 112)")
    g.add_argument("--face-tasks", default=",".join(PEOPLE_TASKS),
                   help="tasks measured for identity: names containing one of these, or 'all' (default %(default)s)")
    g.add_argument("--ocr", default="auto", help="text accuracy's OCR: auto (RapidOCR when installed), rapidocr, "
                                                 "paddleocr, package.module:factory, or none (default auto)")
    g.add_argument("--text-tasks", default=",".join(TEXT_TASKS),
                   help="tasks read by OCR: names containing one of these, or 'all' (default %(default)s)")
    g.add_argument("--metrics-cache", help="metric results cache (default <out>/metrics_cache)")


def _generate_args(p: argparse.ArgumentParser) -> None:
    from ..cli import add_edit_arguments, add_model_arguments
    from ..options import add_arguments

    add_model_arguments(p.add_argument_group("model"))
    add_edit_arguments(p.add_argument_group("edit"))
    add_arguments(p)
    p.set_defaults(seed=43)  # FireRed's redbench_infer.py
    p.add_argument("--force", action="store_true", help="write into a run folder made with other settings")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="firered-bench", description="REDEdit-Bench / GEdit-style evaluation.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="edit every bench row (resumable; sharded by RANK / WORLD_SIZE)")
    _selection_args(g)
    _generate_args(g)
    m = sub.add_parser("metrics", help="offline metrics: size, pixel shift, unedited-region PSNR / SSIM")
    _selection_args(m)
    _metric_args(m)
    j = sub.add_parser("judge", help="score the outputs with an OpenAI-compatible judge")
    _selection_args(j)
    _judge_args(j)
    r = sub.add_parser("report", help="scores.json + report.html; or --compare RUN_A RUN_B")
    _selection_args(r, out_required=False)
    r.add_argument("--failures", choices=("exclude", "min"), default=None, help="override the judge's policy")
    r.add_argument("--aggregation", choices=AGGREGATIONS, default=None,
                   help="override the judge's aggregation (mean or fireredteam; see judge --help)")
    r.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="compare two runs' scores")
    r.add_argument("-o", "--output", default="compare.html", help="--compare: the HTML file to write")
    r.add_argument("--top", type=int, default=20, help="--compare: how many most-changed samples to show")
    a = sub.add_parser("run", help="generate, metrics, judge (with --judge-url), report")
    _selection_args(a)
    _generate_args(a)
    _metric_args(a)
    _judge_args(a)
    return p


# ---- bench selection -------------------------------------------------------------------------------------------

def _fields(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        ours, sep, theirs = pair.partition("=")
        if not sep or not ours or not theirs:
            raise FireRedError(f"--field {pair!r}: expected OURS=THEIRS, e.g. instruction_en=prompt")
        out[ours.strip()] = theirs.strip()
    return out


def selection(args) -> tuple[B.BenchSpec, list[B.BenchRow], dict]:
    """The bench, its selected rows and the selection record; unset arguments come from the run's manifest."""
    from .generate import read_manifest

    saved = (read_manifest(args.out) or {}).get("selection", {}) if args.out else {}

    def pick(name, default=None):
        value = getattr(args, name, None)
        return value if value is not None else saved.get(name, default)

    fields = {**saved.get("fields", {}), **_fields(args.field)}
    spec = B.load_spec(pick("bench", "redbench"))
    if fields:
        spec = spec.with_fields(fields)
    jsonl = pick("jsonl")
    if jsonl is None:
        raise FireRedError("--jsonl is needed (no manifest.json in --out to take it from)")
    jsonl = Path(jsonl).resolve()
    root = Path(pick("root", str(jsonl.parent))).resolve()
    tasks = args.tasks.split(",") if args.tasks else saved.get("tasks")
    lang, limit = pick("lang", spec.default_lang), pick("limit")
    rows = B.read_rows(spec, jsonl, root, lang, tasks, limit)
    record = {"bench": pick("bench", "redbench"), "fields": fields, "jsonl": str(jsonl), "root": str(root),
              "lang": lang, "tasks": tasks, "limit": limit}
    return spec, rows, record


# ---- commands --------------------------------------------------------------------------------------------------

def cmd_generate(args) -> int:
    from ..cli import check_number_args, load_from_args
    from ..lora import LoraSpec
    from .generate import (EditSettings, build_manifest, file_sha256, generate, model_identity,
                           pipeline_from_settings, ranks_from_env, write_manifest)

    spec, rows, record = selection(args)
    check_number_args(args)
    rank, world, local = ranks_from_env()
    device = args.device
    if world > 1 and device in (None, "cuda"):  # one GPU per process: LOCAL_RANK picks it
        import torch

        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    model, steps, speed_settings = load_from_args(args, device=device)
    pipeline, speed, speed_changed = pipeline_from_settings(model, speed_settings)
    settings = EditSettings.from_args(args, steps)
    bench_id = {"name": spec.name, "fields": spec.fields, "lang": record["lang"],
                "jsonl_sha256": file_sha256(record["jsonl"])}
    identity = model_identity(model, [LoraSpec.parse(s) for s in args.lora])
    sources = {"model": args.model or "demo:tiny", "transformer": args.transformer, "vae": args.vae,
               "text_encoder": args.text_encoder, "device": str(model.device)}
    write_manifest(args.out, build_manifest(bench=bench_id, selection=record, edit=settings, speed=speed,
                                            speed_changed=speed_changed,
                                            model=identity, sources=sources, world_size=world), force=args.force)
    summary = generate(rows, args.out, pipeline, settings, rank, world, progress=not args.no_progress)
    print(f"rank {rank}/{world}: generated {summary['generated']}, already done {summary['skipped']}, "
          f"failed {len(summary['failed'])} of {summary['rows']} rows -> {args.out}", file=sys.stderr)
    return 1 if summary["failed"] else 0


def _tasks(value: str) -> tuple[str, ...] | None:
    return None if value.strip() == "all" else tuple(t.strip() for t in value.split(",") if t.strip())


def measures(args):
    """What ``metrics`` measures, from the flags; ``notes`` say why a metric is off."""
    from .faces_metric import FaceIdentity
    from .measure import Measures
    from .text_metric import RAPIDOCR_HINT, TextAccuracy, default_ocr

    if not 0.0 < args.threshold < 1.0:
        raise FireRedError(f"--threshold {args.threshold} must be in (0, 1): a mean RGB difference")
    if not 16 <= args.face_size <= 1024:
        raise FireRedError(f"--face-size {args.face_size} must be in [16, 1024] pixels")
    try:  # the plug-in loaders name their config keys; on the command line the flags are at fault
        face = FaceIdentity(args.face_embedder, args.face_detector, args.face_size) if args.face_embedder else None
    except FireRedError as exc:
        raise FireRedError(f"--face-embedder / --face-detector: {exc}") from None
    ocr = default_ocr() if args.ocr == "auto" else None if args.ocr == "none" else args.ocr
    notes = () if face else ("face identity off: no --face-embedder (a TorchScript or ONNX face embedder)",)
    if ocr is None and args.ocr == "auto":
        notes += (f"text accuracy off: no OCR installed ({RAPIDOCR_HINT})",)
    try:
        text = TextAccuracy(ocr) if ocr else None
    except FireRedError as exc:
        raise FireRedError(f"--ocr: {exc}") from None
    return Measures(threshold=args.threshold, masks=args.masks, face=face, face_tasks=_tasks(args.face_tasks),
                    text=text, text_tasks=_tasks(args.text_tasks), notes=notes)


def cmd_metrics(args, m=None) -> int:
    from .generate import write_json_atomic
    from .measure import MetricCache, measure_rows

    spec, rows, _ = selection(args)
    m = m or measures(args)
    cache = MetricCache(args.metrics_cache or Path(args.out) / "metrics_cache")
    records = measure_rows(rows, args.out, m, cache)
    write_json_atomic(Path(args.out) / METRICS, {
        "threshold": args.threshold, "masks": args.masks, "face": m.face.name if m.face else None,
        "face_tasks": m.face_tasks, "text": m.text.name if m.text else None, "text_tasks": m.text_tasks,
        "records": records})
    faces = sum(r.get("face_identity") is not None for r in records)
    texts = sum(r.get("text_accuracy") is not None for r in records)
    print(f"metrics: {sum(r['error'] is None for r in records)} of {len(records)} samples measured "
          f"({faces} for face identity, {texts} for text accuracy; {cache.computed} computed, {cache.hits} cached)"
          + "".join(f"; {note}" for note in m.notes), file=sys.stderr)
    return 0


def judge_client(args):
    """The judge's client from the flags (nothing sent yet)."""
    from ..llm import ChatClient, ChatEndpoint

    if not args.judge_url or not args.judge_model:
        raise FireRedError("--judge-url and --judge-model are needed to judge")
    return ChatClient(ChatEndpoint(base_url=args.judge_url, model=args.judge_model, api_key_env=args.api_key_env,
                                   timeout_s=args.timeout, max_retries=args.retries, backoff_s=args.backoff,
                                   max_backoff_s=args.max_backoff, concurrency=args.concurrency,
                                   call_budget=args.budget,
                                   cache_dir=args.cache_dir or str(Path(args.out) / "judge_cache")))


def cmd_judge(args, client=None) -> int:
    from tqdm import tqdm

    from .generate import write_json_atomic
    from .judge import judge_rows, request_params

    client = client or judge_client(args)
    spec, rows, record = selection(args)
    prompts = B.load_prompts(spec, record["root"], args.prompts)
    bar = tqdm(total=len(rows), desc="judge", unit="img", disable=None)
    request = request_params(spec, args.aggregation)
    try:  # a refused key (AuthError) stops here, after one call, with one line and exit 2
        records = judge_rows(spec, rows, args.out, prompts, client, on_done=lambda i, r: bar.update(1),
                             request=request)
    finally:
        bar.close()
    failures = sum(r["score"] is None for r in records)
    endpoint = client.endpoint
    judge = {"model": endpoint.model, "base_url": endpoint.base_url, "calls": client.calls,
             "cache_hits": client.cache_hits, "failure_policy": args.failures, "aggregation": args.aggregation,
             "request": request,
             "prompts_sha256": hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()}
    write_json_atomic(Path(args.out) / JUDGE, {"judge": judge, "records": records})
    print(f"judge: {len(records) - failures} of {len(records)} samples scored, {failures} failed, "
          f"{client.calls} calls, {client.cache_hits} cached", file=sys.stderr)
    return 1 if records and failures == len(records) else 0


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def cmd_report(args) -> int:
    from .generate import read_manifest
    from .report import build_scores, load_scores, write_compare, write_report, write_scores

    if args.compare:
        if args.top < 1:
            raise FireRedError(f"--top {args.top} must be at least 1")
        path = write_compare(load_scores(args.compare[0]), load_scores(args.compare[1]), args.output, args.top)
        print(f"wrote {path}", file=sys.stderr)
        return 0
    if not args.out:
        raise FireRedError("report needs --out RUN (or --compare RUN_A RUN_B)")
    spec, rows, _ = selection(args)
    out = Path(args.out)
    judged, measured = _read(out / JUDGE), _read(out / METRICS)
    judge = dict(judged["judge"]) if judged else None
    if judge and args.failures:
        judge["failure_policy"] = args.failures
    if judge and args.aggregation:
        judge["aggregation"] = args.aggregation
    scores = build_scores(run=out.resolve().name, out=out, spec=spec, rows=rows,
                          manifest=read_manifest(out), judge=judge,
                          judge_records=judged["records"] if judged else None,
                          metric_records=measured["records"] if measured else None)
    write_scores(out, scores)
    path = write_report(out, scores)
    overall = scores["overall"]
    if overall and overall["tasks"]:
        print(f"overall {overall['mean']:.3f} over {overall['tasks']} tasks ({overall['judged']} of "
              f"{overall['rows']} judged, {overall['failures']} failed; aggregation "
              f"{overall.get('aggregation', 'mean')})", file=sys.stderr)
    elif overall:
        print(f"no scores: 0 of {overall['rows']} samples judged ({overall['failures']} failed)", file=sys.stderr)
    print(f"wrote {out / 'scores.json'} and {path}", file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    from .generate import ranks_from_env

    rank, world, _ = ranks_from_env()
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if world > 1 and not os.environ.get(name)]
    if missing:  # checked before hours of generation, not at the barrier after them
        raise FireRedError(f"WORLD_SIZE={world} but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                           f"not set: start the run with torchrun --nproc_per_node {world} (or accelerate launch), "
                           "or unset RANK / WORLD_SIZE for one process")
    # before anything is generated, in every process (none is left waiting for one that stopped): a wrong face
    # embedder or OCR fails here, and a refused key or a wrong URL costs one call, not a run
    client = None
    if args.judge_url:
        client = judge_client(args)
        spec, _, record = selection(args)
        B.load_prompts(spec, record["root"], args.prompts)
        client.preflight()
    m = measures(args)
    code = cmd_generate(args)
    if world > 1:
        import datetime

        import torch.distributed as dist

        if not dist.is_initialized():
            try:
                dist.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
            except (ValueError, RuntimeError) as exc:  # e.g. an unreachable MASTER_ADDR
                raise FireRedError(f"cannot join the other {world - 1} process(es) of this run (RANK={rank}, "
                                   f"WORLD_SIZE={world}): {exc}") from None
        dist.barrier()
        dist.destroy_process_group()
        if rank != 0:
            return code
    cmd_metrics(args, m)
    if args.judge_url:
        cmd_judge(args, client)
    args.compare, args.failures, args.aggregation = None, None, None  # the judge's own (judge.json)
    cmd_report(args)
    return code


COMMANDS = {"generate": cmd_generate, "metrics": cmd_metrics, "judge": cmd_judge, "report": cmd_report,
            "run": cmd_run}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (FireRedError, OSError) as exc:
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"firered-bench: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
