#!/usr/bin/env python3
"""Show FireRed models inside ComfyUI's memory manager, in a real headless ComfyUI (issue 9, point 2).

  python scripts/comfyui_memory_proof.py --comfy COMFYUI_DIR --python COMFYUI_VENV_PYTHON --model TINY_MODEL_DIR

Starts ComfyUI (--cpu, a free port, a throw-away base directory) with this pack and a small probe extension that
lists ``comfy.model_management.current_loaded_models`` over HTTP, runs a small FireRed edit through POST /prompt,
and prints what ComfyUI's memory manager holds: after the run (FireRedTransformer, FireRedVAE, FireRedTextEncoder),
after POST /free {"unload_models": true} (the UI's Unload Models: nothing), and after a second run and POST /free
{"unload_models": true, "free_memory": true} (Free model and node cache: nothing, and no FireRed model cached).
Exit status 0 when every step shows what it should. Needs only the standard library (run it with any Python 3).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

PACK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = '''
import sys
import comfy.model_management as mm
from aiohttp import web
from server import PromptServer


@PromptServer.instance.routes.get("/firered_proof/loaded")
async def loaded(request):
    rows = []
    for m in mm.current_loaded_models:
        patcher = m.model
        if patcher is not None:
            rows.append({"class": type(patcher.model).__name__, "device": str(m.device),
                         "mb": round(patcher.model_size() / 2**20, 2), "loaded_mb": round(patcher.loaded_size() / 2**20, 2)})
    loaders = [mod for name, mod in sys.modules.items() if name.endswith(".nodes.loaders")]
    cached = sum(len(mod._cache) for mod in loaders)
    return web.json_response({"current_loaded_models": rows, "firered_models_cached": cached})


NODE_CLASS_MAPPINGS = {}
'''


def request(url: str, data: dict | None = None):
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read().decode() or "null")


def prompt(model_name: str) -> dict:
    """A small edit of ComfyUI's example.png (64x64 output, 2 steps, true CFG on)."""
    m = ["1", 0]
    return {
        "1": {"class_type": "FireRedModelLoader", "inputs": {"model_name": model_name, "dtype": "auto",
                                                             "device": "auto", "offload": "none"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "3": {"class_type": "FireRedReferenceImages", "inputs": {"model": m, "vl_size": 56, "vae_sizing": "area",
                                                                 "vae_size": 64, "image1": ["2", 0]}},
        "4": {"class_type": "FireRedEncodeInstruction", "inputs": {"model": m, "prompt": "make it red",
                                                                   "prompt_mode": "pipeline", "refs": ["3", 0]}},
        "5": {"class_type": "FireRedEncodeInstruction", "inputs": {"model": m, "prompt": " ",
                                                                   "prompt_mode": "pipeline", "refs": ["3", 0]}},
        "6": {"class_type": "FireRedImageSize", "inputs": {"mode": "width x height", "megapixels": 1.0,
                                                           "width": 64, "height": 64}},
        "7": {"class_type": "FireRedSampler", "inputs": {"model": m, "positive": ["4", 0], "negative": ["5", 0],
                                                         "latent": ["6", 0], "seed": 0, "steps": 2, "true_cfg": 4.0,
                                                         "shift": 0.0, "denoise": 1.0, "batch_size": 1,
                                                         "seed_mode": "batch"}},
        "8": {"class_type": "FireRedDecode", "inputs": {"model": m, "latent": ["7", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "memory_proof"}},
    }


def run_prompt(base: str, graph: dict, timeout: float = 600) -> str:
    pid = request(base + "/prompt", {"prompt": graph})["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hist = request(f"{base}/history/{pid}")
        if pid in hist and hist[pid]["status"].get("completed") is not None:
            return hist[pid]["status"]["status_str"]
        time.sleep(1)
    return "timed out"


def show(base: str, label: str) -> dict:
    state = request(base + "/firered_proof/loaded")
    rows = state["current_loaded_models"]
    listing = ", ".join(f"{r['class']} ({r['mb']} MB on {r['device']})" for r in rows) or "(empty)"
    print(f"{label:<48} current_loaded_models: {listing}; FireRed models cached: {state['firered_models_cached']}")
    return state


def free(base: str, **flags) -> None:
    request(base + "/free", flags)
    time.sleep(3)  # the prompt worker applies the flags between prompts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfy", required=True, help="ComfyUI source folder")
    ap.add_argument("--python", required=True, help="the Python that runs ComfyUI")
    ap.add_argument("--model", required=True, help="a FireRed model folder (e.g. the tiny demo model)")
    a = ap.parse_args()
    run = tempfile.mkdtemp(prefix="firered-memory-proof.")
    for sub in ("custom_nodes", "input", "output", "models/firered"):
        os.makedirs(os.path.join(run, sub))
    os.symlink(PACK, os.path.join(run, "custom_nodes", "ComfyUI-FireRed-Edit"))
    with open(os.path.join(run, "custom_nodes", "firered_memory_probe.py"), "w") as f:
        f.write(PROBE)
    os.symlink(os.path.abspath(a.model), os.path.join(run, "models", "firered", "FireRed-Image-Edit-1.0"))
    shutil.copy(os.path.join(a.comfy, "input", "example.png"), os.path.join(run, "input", "example.png"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(os.path.join(run, "server.log"), "w")
    proc = subprocess.Popen([a.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--disable-auto-launch", "--base-directory", run, "--database-url", "sqlite:///:memory:"],
                            cwd=a.comfy, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    ok = True
    try:
        for _ in range(300):
            try:
                request(base + "/firered_proof/loaded")
                break
            except OSError:
                if proc.poll() is not None:
                    print(open(log.name).read()[-3000:])
                    return 1
                time.sleep(1)
        graph = prompt("FireRed-Image-Edit-1.0")
        show(base, "before any run")
        print("run 1:", run_prompt(base, graph))
        s1 = show(base, "after run 1")
        names = {r["class"] for r in s1["current_loaded_models"]}
        ok &= {"FireRedTransformer", "FireRedVAE", "FireRedTextEncoder"} <= names
        free(base, unload_models=True)
        s2 = show(base, "after POST /free {unload_models}")
        ok &= not any(r["class"].startswith("FireRed") for r in s2["current_loaded_models"])
        graph["4"]["inputs"]["prompt"] = "make it blue"  # a new prompt: the text encoder runs again
        print("run 2:", run_prompt(base, graph))
        s3 = show(base, "after run 2 (models reload)")
        ok &= {"FireRedTransformer", "FireRedVAE", "FireRedTextEncoder"} <= {r["class"] for r in s3["current_loaded_models"]}
        free(base, unload_models=True, free_memory=True)
        s4 = show(base, "after POST /free {unload_models, free_memory}")
        ok &= not s4["current_loaded_models"] and s4["firered_models_cached"] == 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    lines = [line for line in open(log.name) if "Requested to load FireRed" in line or "firered" in line.lower()
             and ("error" in line.lower() or "warning" in line.lower())]
    print("server log:", *(line.rstrip() for line in lines[:8]), sep="\n  ")
    print("memory manager proof:", "ok" if ok else "FAILED", f"(run folder {run})")
    if ok:
        shutil.rmtree(run, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
