"""Atomic training checkpoints in safetensors + JSON (no pickle).

A checkpoint is a folder ``step-XXXXXXXX`` holding ``trainable.safetensors`` (the trained parameters by name),
``optimizer.safetensors`` + ``optimizer.json`` (keyed by parameter name, with or without FSDP), ``ema.safetensors``
(when EMA is on), the objective's extra tensors (``nft_old.safetensors``: the NFT old policy), ``rng.safetensors`` and
``state.json`` (step, sampler, LR scheduler, loss history), all whole tensors. It is written under a temporary name
and renamed into place, then ``latest`` is replaced atomically, so a crash mid-save leaves the previous checkpoint
and pointer intact.

``manifest.json`` (written last, before the rename) records every file's size and SHA-256. On resume the latest
checkpoint is verified against it; a checkpoint damaged after it was written (a truncated or altered file, a copy
cut short) is skipped with a warning and the newest complete one before it is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..embed_cache import write_safetensors
from ..errors import FireRedError

LATEST = "latest"
CORE_FILES = ("trainable", "optimizer", "ema", "rng")  # every other *.safetensors is an objective's extra state
MANIFEST = "manifest.json"

log = logging.getLogger(__name__)


class CheckpointError(FireRedError):
    """A checkpoint named for resuming is incomplete or damaged."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record the size and SHA-256 of every file of ``folder`` in its manifest."""
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify_checkpoint(path: Path) -> str | None:
    """None when every file of the manifest is there with its size and hash; else the first problem found."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return None if (path / "state.json").is_file() else f"{path} has no {MANIFEST} (an unfinished save?)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{manifest} is unreadable ({exc})"
    for name, info in files.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        size = file.stat().st_size
        if size != info["size"]:
            return f"{file} has {size} bytes, the manifest says {info['size']} (truncated?)"
        if _sha256(file) != info["sha256"]:
            return f"{file} does not match its SHA-256 in the manifest (altered or corrupt)"
    return None


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}::{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}::{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.rsplit("::", 1)
        idx = int(idx) if idx.lstrip("-").isdigit() else idx
        state.setdefault(idx, {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def optimizer_by_name(state: dict, names: list[str]) -> dict:
    """A torch optimizer state dict keyed by the trained tensors' names, as FSDP's full optimizer state dict is: a
    plain (1-process or DDP) optimizer's integer keys, its parameters in order, become ``names`` (the same order);
    name keys stay. Plain optimizers load either (they pair saved and current parameters by order), FSDP only names,
    so every checkpoint is written with names and an older integer-keyed one is renamed on loading."""
    order = [p for group in state["param_groups"] for p in group["params"]]
    if all(isinstance(p, str) for p in order):
        return state
    if len(order) != len(names):
        raise CheckpointError(f"the checkpoint's optimizer holds {len(order)} tensors, this run trains {len(names)}")
    rename = dict(zip(order, names))
    return {"state": {rename[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [rename[p] for p in g["params"]]} for g in state["param_groups"]]}


def rng_state() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def save_checkpoint(root: Path, step: int, trainable: dict[str, torch.Tensor], optimizer_state: dict,
                    state: dict, ema: dict | None = None, keep: int = 2,
                    extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
    if ema is not None:
        write_safetensors(tmp / "ema.safetensors", ema["tensors"],  # sorted header: byte-stable
                          {"updates": str(ema["updates"]), "decay": str(ema["decay"])})
    for stem, tensors in (extra or {}).items():
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / f"{stem}.safetensors"))
    save_file(rng_state(), str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state))
    write_manifest(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / LATEST)
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint: the ``latest`` pointer's if it verifies, else (with a warning) the newest
    earlier one that does; None when there is none."""
    pointer = root / LATEST
    if not pointer.exists():
        return None
    first = root / pointer.read_text().strip()
    others = sorted((p for p in root.glob("step-*") if p.is_dir() and p.name < first.name), reverse=True)
    for path in [first, *others]:
        problem = verify_checkpoint(path) if path.is_dir() else f"{path} does not exist"
        if problem is None:
            if path != first:
                log.warning("resuming from the previous complete checkpoint %s instead", path)
            return path
        log.warning("checkpoint %s is unusable: %s", path.name, problem)
    return None


def checked_checkpoint(path: Path) -> Path:
    """``path`` if it is a complete checkpoint (a named resume point is never silently replaced by another)."""
    problem = verify_checkpoint(path) if path.is_dir() else f"{path} is not a checkpoint folder"
    if problem is not None:
        raise CheckpointError(f"cannot resume from {path}: {problem}")
    return path


def load_checkpoint(path: Path) -> dict:
    meta = json.loads((path / "optimizer.json").read_text())
    out = {
        "trainable": load_file(str(path / "trainable.safetensors")),
        "optimizer": _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), meta),
        "state": json.loads((path / "state.json").read_text()),
        "rng": load_file(str(path / "rng.safetensors")),
        "ema": None,
        "extra": {p.stem: load_file(str(p)) for p in sorted(path.glob("*.safetensors")) if p.stem not in CORE_FILES},
    }
    ema_file = path / "ema.safetensors"
    if ema_file.exists():
        from safetensors import safe_open

        with safe_open(str(ema_file), "pt") as fh:
            info = fh.metadata()
        out["ema"] = {"tensors": load_file(str(ema_file)), "updates": int(info["updates"])}
    return out
