"""Benchmark: load time and peak memory per single-file format for the medium preset transformer (not a test).

    python -m benchmarks.load [--dir DIR] [--formats safetensors-fp32,comfy-bf16,...]

Each load runs in a fresh subprocess, with imports done before the clock starts; "peak +RSS" is the peak resident
memory during the load above what the process held before it (Linux VmHWM, reset via /proc/self/clear_refs), next to
the file size and the loaded model's size; the peak includes file pages mapped while reading (page cache, reclaimable),
"+anon after" is the private memory the loaded model holds. So "needs less than twice the file" can be read off the table.
GGUF rows end in the mode: ``-load`` dequantises at load, ``-runtime`` keeps the packed bytes (GGUFLinear) mapped from
the file; "model MB" counts parameters and buffers. "fwd peak +RSS" is the peak after one small forward pass (every
weight touched, so runtime GGUF's file pages are resident by then).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import status_mb
from firered_core.formats.gguf import write_gguf

FORMATS = ("safetensors-fp32", "comfy-bf16", "comfy-fp8_e4m3fn", "comfy-fp8_scaled", "gguf-Q8_0-load",
           "gguf-Q8_0-runtime", "gguf-Q4_0-runtime", "torch-pt")
GGUF_MODES = ("-load", "-runtime")


def file_format(name: str) -> str:
    """The file a row reads: GGUF rows share one file per quantisation whatever the mode."""
    for suffix in GGUF_MODES:
        if name.startswith("gguf-") and name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def gguf_mode(name: str) -> str:
    return "runtime" if name.endswith("-runtime") else "load"


def write_formats(out: Path, names: list[str]) -> dict[str, Path]:
    from safetensors.torch import save_file

    from firered_core.demo_models import build_components

    sd = {k: v.contiguous() for k, v in build_components("medium")["transformer"].state_dict().items()}
    pre = "model.diffusion_model."
    paths = {}
    for row in names:
        name = file_format(row)
        path = out / f"transformer-{name}{'.gguf' if name.startswith('gguf') else '.pt' if name == 'torch-pt' else '.safetensors'}"
        paths[row] = path
        if path.exists():
            continue
        if name == "safetensors-fp32":
            save_file(sd, str(path))
        elif name == "comfy-bf16":
            save_file({pre + k: v.to(torch.bfloat16) for k, v in sd.items()}, str(path))
        elif name == "comfy-fp8_e4m3fn":
            save_file({pre + k: v.to(torch.float8_e4m3fn if v.dim() == 2 else torch.bfloat16) for k, v in sd.items()},
                      str(path))
        elif name == "comfy-fp8_scaled":
            out_sd = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
            for k, v in sd.items():
                if v.dim() == 2:
                    scale = v.abs().max().clamp_min(1e-12) / 448.0
                    out_sd[pre + k] = (v / scale).to(torch.float8_e4m3fn)
                    out_sd[pre + k[: -len("weight")] + "scale_weight"] = scale.reshape(1)
                else:
                    out_sd[pre + k] = v.to(torch.bfloat16)
            save_file(out_sd, str(path))
        elif name in ("gguf-Q8_0", "gguf-Q4_0"):
            write_gguf(sd, path, name[len("gguf-"):])
        elif name == "torch-pt":
            torch.save(sd, path)
        else:
            raise ValueError(f"unknown format {row!r}; known: {', '.join(FORMATS)}")
    return paths


def _forward(module: torch.nn.Module) -> None:
    """One small forward pass (256 image tokens, 16 text tokens): touches every weight once."""
    cfg = module.config
    gen = torch.Generator().manual_seed(0)
    dtype = next(p.dtype for p in module.parameters() if p.is_floating_point())
    x = torch.randn(1, 256, cfg.in_channels, generator=gen).to(dtype)
    c = torch.randn(1, 16, cfg.joint_attention_dim, generator=gen).to(dtype)
    with torch.no_grad():
        module(hidden_states=x, encoder_hidden_states=c, encoder_hidden_states_mask=None,
               timestep=torch.tensor([0.5]), img_shapes=[[(1, 16, 16)]], return_dict=False)


def _measure(path: str, dtype: str, mode: str) -> None:
    """Child process: load once, print JSON with seconds and peak RSS; then one forward pass and its peak RSS."""
    from accelerate import init_empty_weights  # noqa: F401  (imports are not part of the load time)
    from diffusers import QwenImageTransformer2DModel  # noqa: F401

    from firered_core.formats import load_single_file

    torch.set_num_threads(2)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    base, anon = status_mb("VmRSS"), status_mb("RssAnon")
    t0 = time.perf_counter()
    module = load_single_file("transformer", path, getattr(torch, dtype), gguf_mode=mode)
    seconds = time.perf_counter() - t0
    peak, anon_after = status_mb("VmHWM") - base, status_mb("RssAnon") - anon
    tensors = list(module.parameters()) + list(module.buffers())
    size = sum(t.numel() * t.element_size() for t in tensors)
    _forward(module)
    print(json.dumps({"seconds": seconds, "peak_mb": peak, "before_mb": base, "model_mb": size / 2 ** 20,
                      "anon_mb": anon_after, "fwd_peak_mb": status_mb("VmHWM") - base}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where to write the files (default: a temp dir)")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--gguf-mode", default="load", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        _measure(args.measure, args.dtype, args.gguf_mode)
        return
    out = args.dir or Path(tempfile.mkdtemp(prefix="firered-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    paths = write_formats(out, args.formats.split(","))
    print(f"medium transformer, load to {args.dtype}, files in {out}")
    print(f"{'format':<20} {'file MB':>9} {'load s':>8} {'peak +RSS MB':>12} {'RSS before':>11} {'model MB':>9} "
          f"{'+anon after':>11} {'fwd peak +RSS':>13}")
    for name, path in paths.items():
        res = subprocess.run([sys.executable, "-m", "benchmarks.load", "--measure", str(path),
                              "--dtype", args.dtype, "--gguf-mode", gguf_mode(name)], capture_output=True, text=True)
        if res.returncode:
            print(f"{name:<20} failed: {res.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{name:<20} {path.stat().st_size / 2 ** 20:>9.0f} {r['seconds']:>8.2f} {r['peak_mb']:>12.0f} "
              f"{r['before_mb']:>11.0f} {r['model_mb']:>9.0f} {r['anon_mb']:>11.0f} {r['fwd_peak_mb']:>13.0f}")


if __name__ == "__main__":
    main()
