"""Engines: score a stage's items shard by shard, in local worker processes or on Ray Data; resume from shards.

A shard is ``shard_size`` consecutive items; its scores are written to ``<stage dir>/shards/NNNNNN.json``
atomically when it completes, so a killed run re-scores only the missing shards. Scoring is pure and single-
threaded in every engine, and the decisions are made afterwards on the driver from all scores in item order, so
the engines cannot disagree.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

from tqdm.auto import tqdm

from .config import EngineConfig
from .extras import require
from .files import write_text
from .imageops import single_thread

log = logging.getLogger(__name__)

_STAGES: dict[str, object] = {}


class SimulatedKill(RuntimeError):
    """Tests: the run stops after N shards, as a killed job would."""


def build_from_spec(spec: str):
    """Worker side: the stage for a JSON spec, built once per process (a model loads once per worker)."""
    if spec not in _STAGES:
        from .stages import build_stage

        data = json.loads(spec)
        _STAGES[spec] = build_stage(data["config"], data["context"])
    return _STAGES[spec]


def score_shard(spec: str, payload: str) -> str:
    """Score one shard: JSON list of items in, JSON list of score dicts out."""
    stage = build_from_spec(spec)
    with single_thread():
        return json.dumps([stage.score(item) for item in json.loads(payload)])


class _ShardScorer:
    """Ray actor for stages that hold a model: built once per actor, then fed shards."""

    def __init__(self, spec: str):
        self.spec = spec
        build_from_spec(spec)

    def __call__(self, batch: dict) -> dict:
        return {"shard": batch["shard"], "result": [score_shard(self.spec, p) for p in batch["payload"]]}


def _ray_map(row: dict, spec: str) -> dict:
    return {"shard": row["shard"], "result": score_shard(spec, row["payload"])}


class LocalPool:
    """The local engine's worker processes, started once per run (on first use) and shared by all its stages."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def map(self, spec: str, todo: dict[int, str]):
        if self.workers == 0:
            for idx, payload in todo.items():
                yield idx, score_shard(spec, payload)
            return
        if self._pool is None:  # fork where there is one (workers start without re-importing torch, as
            # DataLoader workers do); spawn elsewhere
            method = "fork" if "fork" in get_all_start_methods() else "spawn"
            self._pool = ProcessPoolExecutor(self.workers, mp_context=get_context(method))
        futures = {self._pool.submit(score_shard, spec, payload): idx for idx, payload in todo.items()}
        try:
            for fut in as_completed(futures):
                yield futures[fut], fut.result()
        finally:
            for fut in futures:
                fut.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ray(spec: str, todo: dict[int, str], cfg: EngineConfig, uses_model: bool):
    ray = require("ray", "the Ray engine (engine.kind: ray)")
    if not ray.is_initialized():
        kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
        if cfg.address:
            ray.init(address=cfg.address, **kwargs)
        else:
            root = str(Path(__file__).resolve().parents[2])
            path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
            ray.init(num_cpus=max(1, cfg.workers), runtime_env={"env_vars": {"PYTHONPATH": path}}, **kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = False
    items = [{"shard": idx, "payload": payload} for idx, payload in todo.items()]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    conc = max(1, cfg.workers)
    if uses_model:  # actor pool: the model loads once per actor; GPUs when asked
        ds = ds.map_batches(_ShardScorer, fn_constructor_args=(spec,), batch_size=1, concurrency=conc,
                            num_gpus=cfg.gpus_per_actor or None, batch_format="numpy")
    else:  # CPU tasks
        ds = ds.map(_ray_map, fn_kwargs={"spec": spec}, concurrency=conc, num_cpus=1)
    for row in ds.iter_rows():  # streaming: shards arrive as they finish
        yield int(row["shard"]), str(row["result"])


def run_shards(spec: str, items: list[dict], folder: Path, cfg: EngineConfig, uses_model: bool = False,
               stop_after: int | None = None, desc: str = "", pool: LocalPool | None = None) -> list[dict]:
    """Scores of ``items`` in order, computing only the shards not yet in ``folder``. The local engine uses
    ``pool`` (one per run) or, without one, a pool of its own for this call."""
    folder.mkdir(parents=True, exist_ok=True)
    size = cfg.shard_size
    shards = {i // size: items[i:i + size] for i in range(0, len(items), size)}
    payloads = {i: json.dumps(chunk, sort_keys=True) for i, chunk in shards.items()}
    keys = {i: hashlib.sha256(p.encode()).hexdigest()[:24] for i, p in payloads.items()}
    done = {i for i in shards if _stored(folder / f"{i:06d}.json", keys[i]) is not None}
    todo = {i: payloads[i] for i in shards if i not in done}
    if done:
        log.info("%s: %d/%d shards already scored, resuming", desc, len(done), len(shards))
    if todo:
        own = None
        if cfg.kind == "ray":
            runner = _ray(spec, todo, cfg, uses_model)
        else:
            own = None if pool is not None else LocalPool(cfg.workers)
            runner = (pool or own).map(spec, todo)
        written = 0
        with tqdm(total=len(shards), initial=len(done), desc=desc, unit="shard", leave=False) as bar:
            for idx, result in runner:
                write_text(folder / f"{idx:06d}.json", f'{{"key": "{keys[idx]}", "scores": {result}}}')
                bar.update(1)
                written += 1
                if stop_after is not None and written >= stop_after:
                    runner.close()
                    raise SimulatedKill(f"stopped after {written} shard(s)")
        if own is not None:
            own.close()
    out: list[dict] = []
    for i in sorted(shards):
        got = _stored(folder / f"{i:06d}.json", keys[i])
        if got is None or len(got) != len(shards[i]):
            raise RuntimeError(f"shard {folder / f'{i:06d}.json'} does not hold the scores of its {len(shards[i])} items")
        out += got
    return out


def _stored(path: Path, key: str) -> list | None:
    """A shard's scores when the file exists and was computed from the same items (else it is redone)."""
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data["scores"] if data.get("key") == key else None
