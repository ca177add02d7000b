"""Atomic training checkpoints in safetensors + JSON (no pickle).

A checkpoint is a folder ``step-XXXXXXXX`` holding ``trainable.safetensors`` (the trained parameters by name),
``optimizer.safetensors`` + ``optimizer.json``, ``ema.safetensors`` (when EMA is on), ``rng.safetensors`` and
``state.json`` (step, sampler, LR scheduler, loss history). It is written under a temporary name and renamed into
place, then ``latest`` is replaced atomically, so a crash mid-save leaves the previous checkpoint and pointer intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


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
                    state: dict, ema: dict | None = None, keep: int = 2) -> Path:
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
        save_file({k: v.contiguous() for k, v in ema["tensors"].items()}, str(tmp / "ema.safetensors"),
                  metadata={"updates": str(ema["updates"]), "decay": str(ema["decay"])})
    save_file(rng_state(), str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state))
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
    pointer = root / LATEST
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.json").exists() else None


def load_checkpoint(path: Path) -> dict:
    meta = json.loads((path / "optimizer.json").read_text())
    out = {
        "trainable": load_file(str(path / "trainable.safetensors")),
        "optimizer": _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), meta),
        "state": json.loads((path / "state.json").read_text()),
        "rng": load_file(str(path / "rng.safetensors")),
        "ema": None,
    }
    ema_file = path / "ema.safetensors"
    if ema_file.exists():
        from safetensors import safe_open

        with safe_open(str(ema_file), "pt") as fh:
            info = fh.metadata()
        out["ema"] = {"tensors": load_file(str(ema_file)), "updates": int(info["updates"])}
    return out
