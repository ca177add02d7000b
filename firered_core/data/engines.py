"""Engines: score a stage's items shard by shard, in local worker processes or on Ray Data; resume from shards.

A shard is ``shard_size`` consecutive lines of a JSONL work file; only its byte range travels to a worker, which
reads the rows itself. Its scores are written to ``<stage dir>/shards/NNNNNN.json`` atomically when it completes,
so a killed run re-scores only the missing shards. Scoring is pure and single-threaded in every engine, and the
decisions are made afterwards on the driver from the stored scores, shard by shard in order, so the engines cannot
disagree.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from itertools import islice
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

from tqdm.auto import tqdm

from .config import EngineConfig
from .extras import require
from .files import write_text
from .imageops import single_thread
from .rows import Shards, read_range

log = logging.getLogger(__name__)

_STAGES: dict[str, object] = {}


def build_from_spec(spec: str):
    """Worker side: the stage for a JSON spec, built once per process (a model loads once per worker)."""
    if spec not in _STAGES:
        from .stages import build_stage

        data = json.loads(spec)
        _STAGES[spec] = build_stage(data["config"], data["context"])
    return _STAGES[spec]


def score_shard(spec: str, path: str, start: int, end: int) -> str:
    """Score one shard, read by the worker itself from its byte range of a JSONL work file (nothing but the
    range travels): JSON list of score dicts out."""
    stage = build_from_spec(spec)
    items = read_range(path, start, end)
    with single_thread():
        return json.dumps([stage.score(item) for item in items])


class _ShardScorer:
    """Ray actor for stages that hold a model: built once per actor, then fed shards."""

    def __init__(self, spec: str):
        self.spec = spec
        build_from_spec(spec)

    def __call__(self, batch: dict) -> dict:
        return {"shard": batch["shard"], "result": [score_shard(self.spec, str(p), int(a), int(b)) for p, a, b in
                                                    zip(batch["path"], batch["start"], batch["end"])]}


def _ray_map(row: dict, spec: str) -> dict:
    return {"shard": row["shard"], "result": score_shard(spec, row["path"], int(row["start"]), int(row["end"]))}


class LocalPool:
    """The local engine's worker processes, started once per run (on first use) and shared by all its stages."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def map(self, spec: str, todo: dict[int, tuple[str, int, int]]):
        """(shard, scores JSON) as shards finish; at most two shards per worker in flight (results are written
        as they come, so memory stays bounded by the shard size)."""
        if self.workers == 0:
            for idx, job in todo.items():
                yield idx, score_shard(spec, *job)
            return
        if self._pool is None:  # fork where there is one (workers start without re-importing torch, as
            # DataLoader workers do); spawn elsewhere
            method = "fork" if "fork" in get_all_start_methods() else "spawn"
            self._pool = ProcessPoolExecutor(self.workers, mp_context=get_context(method))
        queue = iter(todo.items())
        running: dict = {}
        try:
            while True:
                for idx, job in islice(queue, 2 * self.workers - len(running)):
                    running[self._pool.submit(score_shard, spec, *job)] = idx
                if not running:
                    return
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in sorted(finished, key=running.__getitem__):
                    yield running.pop(fut), fut.result()
        finally:
            for fut in running:
                fut.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_ray(cfg: EngineConfig):
    """Connect to ``cfg.address`` or start a local Ray with ``cfg.workers`` CPUs (no dashboard, quiet); workers
    find this package through PYTHONPATH. Nothing happens when Ray is already up."""
    ray = require("ray", "the Ray engine (engine.kind: ray)")
    if not ray.is_initialized():
        kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
        if cfg.address:
            ray.init(address=cfg.address, **kwargs)
        else:
            root = str(Path(__file__).resolve().parents[2])
            path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
            ray.init(num_cpus=max(1, cfg.workers), runtime_env={"env_vars": {"PYTHONPATH": path}}, **kwargs)
    return ray


def _ray(spec: str, todo: dict[int, tuple[str, int, int]], cfg: EngineConfig, uses_model: bool):
    ray = start_ray(cfg)
    ray.data.DataContext.get_current().enable_progress_bars = False
    items = [{"shard": idx, "path": path, "start": a, "end": b} for idx, (path, a, b) in todo.items()]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    conc = max(1, cfg.workers)
    if uses_model and cfg.gpus_per_actor > 0:  # actor pool: the model loads once per actor, on its GPU
        ds = ds.map_batches(_ShardScorer, fn_constructor_args=(spec,), batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=conc), num_gpus=cfg.gpus_per_actor,
                            batch_format="numpy")
    else:  # CPU tasks; a model stage's model loads once per worker process (cached there, as in the local pool)
        ds = ds.map(_ray_map, fn_kwargs={"spec": spec}, compute=ray.data.TaskPoolStrategy(size=conc), num_cpus=1)
    for row in ds.iter_rows():  # streaming: shards arrive as they finish
        yield int(row["shard"]), str(row["result"])


def run_shards(spec: str, shards: Shards, folder: Path, cfg: EngineConfig, uses_model: bool = False,
               desc: str = "", pool: LocalPool | None = None) -> list[str]:
    """Score every shard of ``shards`` not yet in ``folder`` (``NNNNNN.json``, one per shard, written as it
    completes); return each shard's key for :func:`load_scores`. The local engine uses ``pool`` (one per run) or,
    without one, a pool of its own for this call."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = [shards.key(i) for i in range(len(shards))]
    todo = {i: (shards.path, shards.bounds[i], shards.bounds[i + 1]) for i in range(len(shards))
            if not _is_stored(folder / f"{i:06d}.json", keys[i])}
    if len(todo) < len(shards):
        log.info("%s: %d/%d shards already scored, resuming", desc, len(shards) - len(todo), len(shards))
    if todo:
        own = None
        if cfg.kind == "ray":
            runner = _ray(spec, todo, cfg, uses_model)
        else:
            own = None if pool is not None else LocalPool(cfg.workers)
            runner = (pool or own).map(spec, todo)
        with tqdm(total=len(shards), initial=len(shards) - len(todo), desc=desc, unit="shard", leave=False) as bar:
            for idx, result in runner:
                write_text(folder / f"{idx:06d}.json", f'{{"key": "{keys[idx]}", "scores": {result}}}')
                bar.update(1)
        if own is not None:
            own.close()
    return keys


def load_scores(folder: Path, idx: int, key: str, count: int) -> list[dict]:
    """Shard ``idx``'s scores (``count`` of them, computed from the rows whose hash is ``key``)."""
    path = folder / f"{idx:06d}.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    if data.get("key") != key or len(data["scores"]) != count:
        raise RuntimeError(f"shard {path} does not hold the scores of its {count} items")
    return data["scores"]


def _is_stored(path: Path, key: str) -> bool:
    """Whether a shard's scores exist and were computed from the same rows (else it is redone)."""
    if not path.exists():
        return False
    with open(path, encoding="utf-8") as fh:
        head = fh.read(48)
    return head.startswith(f'{{"key": "{key}"')
