"""Side by side with ComfyUI's native Qwen-Image path: its model classes and sampler against ours, same weights.

    python -m benchmarks.vs_comfy --comfy /path/to/ComfyUI --comfy-python /path/to/comfy/venv/bin/python

The medium demo preset is converted to a ComfyUI single file (``model.diffusion_model.`` keys, the layout
ComfyUI's own checkpoints use). Our text encoder and VAE encode the prompt, the negative prompt and the reference
once; both sides then sample from the same noise, the same sigmas (ours, given to ComfyUI's ``sample_custom``), the
same prompt embeddings and reference latents, at the same true-CFG scale, each in a fresh process (ours with this
interpreter, ComfyUI with ``--comfy-python``; ComfyUI is imported from the path given, never installed). Text
encoding and VAE decode are outside the timed region on both sides (ComfyUI's own VAE wants its own file layout),
so "edit" here is model load excluded, sampling included: per-step time, whole sampling time and peak RSS (peak
VRAM on a GPU), as ours / ComfyUI ratios. "load" times reading the file into the model on both sides, the libraries
(diffusers / comfy) already imported. ComfyUI's model file detection reads only the layer count and assumes the
full-size widths; the medium file's widths are handed to it from the tensor shapes, as its own config would.

The samplers differ in one known way: ComfyUI's CFG is plain ``u + s (c - u)``, ours (as diffusers' edit
pipeline) rescales to the conditional prediction's norm; the final-latent difference is printed, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._common import add_run_arguments, bench_image, peak_rss_mb

PROMPT, NEGATIVE = "make the sky purple", " "


def write_comfy_transformer(model_dir: Path, out: Path) -> Path:
    """The model folder's transformer as one ComfyUI-style safetensors file (``model.diffusion_model.`` prefix)."""
    from safetensors.torch import load_file, save_file

    if out.exists():
        return out
    state = {}
    for f in sorted((model_dir / "transformer").glob("*.safetensors")):
        state.update(load_file(f))
    tmp = out.with_suffix(".tmp")
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(out)
    return out


def make_inputs(model_dir: Path, work: Path, size: int, steps: int, device: str, dtype: str) -> Path:
    """Encode prompt, negative and reference with our components; noise and sigmas from our pipeline's rules."""
    import torch
    from safetensors.torch import save_file

    from firered_core import latents as L
    from firered_core.model import load_model, parse_dtype
    from firered_core.pipeline import EditPipeline, make_noise
    from firered_core.references import prepare_references
    from firered_core.sampling import make_sigmas

    model = load_model(model_dir, dtype=parse_dtype(dtype), device=device)
    pipe = EditPipeline(model)
    refs = prepare_references([bench_image(size)], vae_area=size * size)
    with torch.inference_mode():
        cond = pipe.encode_prompts([PROMPT], refs)
        uncond = pipe.encode_prompts([NEGATIVE], refs)
        ref = pipe.encode_references(refs, cond.embeds.dtype)
    noise = make_noise(1, size, size, 0, cond.embeds.dtype, model.device)
    sigmas = make_sigmas(steps, noise.shape[1], model.scheduler_config)
    vae_cfg = model.vae.config
    (_, rh, rw), = ref.shapes
    raw_ref = L.denormalize(L.unpack(ref.tokens, rh * 16, rw * 16), vae_cfg)  # ComfyUI's LATENT: raw VAE space
    out = work / "inputs.safetensors"
    tensors = {"cond": cond.embeds, "uncond": uncond.embeds, "ref_tokens": ref.tokens, "ref_raw": raw_ref,
               "noise": noise, "noise_unpacked": L.unpack(noise, size, size), "sigmas": sigmas.float(),
               "mean": torch.tensor(vae_cfg.latents_mean), "std": torch.tensor(vae_cfg.latents_std)}
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(out),
              metadata={"ref_shape": json.dumps([rh, rw]), "size": str(size)})
    return out


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _vram(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0.0


def run_ours(file: Path, inputs: Path, cfg: float, device: str, dtype: str) -> dict:
    """Our transformer from the ComfyUI file, our sampler (``sampling.sample``) with true CFG."""
    import torch
    from safetensors.torch import load_file, safe_open

    from firered_core import latents as L
    from firered_core.conditioning import PromptEmbeds
    from firered_core.formats import load_single_file
    from firered_core.model import parse_dtype
    from firered_core.references import RefLatents
    from firered_core.sampling import sample, transformer_denoiser
    from diffusers import QwenImageTransformer2DModel  # noqa: F401  imported before the clock, as comfy.sd is

    torch_dtype = parse_dtype(dtype)
    t0 = time.perf_counter()
    tr = load_single_file("transformer", file, torch_dtype).to(device).eval()
    load = time.perf_counter() - t0
    x = load_file(str(inputs), device=device)
    with safe_open(str(inputs), "pt") as f:
        meta = f.metadata()
    rh, rw = json.loads(meta["ref_shape"])
    size = int(meta["size"])
    t = {k: v.to(torch_dtype) for k, v in x.items() if k != "sigmas"}
    ref = RefLatents(t["ref_tokens"], [(1, rh, rw)])
    shapes = [[L.token_grid(size, size), (1, rh, rw)]]
    den = transformer_denoiser(tr, ref, shapes)
    marks: list[float] = []
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = sample(den, t["noise"], x["sigmas"].to(device), PromptEmbeds(t["cond"], None),
                     PromptEmbeds(t["uncond"], None), true_cfg=cfg,
                     callback=lambda info: (_sync(device), marks.append(time.perf_counter())))
    _sync(device)
    total = time.perf_counter() - start
    raw = L.denormalize(L.unpack(out.float(), size, size), {"latents_mean": x["mean"].tolist(),
                                                            "latents_std": x["std"].tolist()})
    return {"side": "ours", "load_s": load, "sample_s": total, "steps": _step_times(start, marks),
            "peak_rss_mb": peak_rss_mb(), "peak_vram_mb": _vram(device), "latent": raw.flatten().tolist()}


def _step_times(start: float, marks: list[float]) -> list[float]:
    return [b - a for a, b in zip([start] + marks[:-1], marks)]


def run_comfy(comfy: Path, file: Path, inputs: Path, cfg: float, device: str, dtype: str) -> dict:
    """ComfyUI's loader (``comfy.sd.load_diffusion_model``), model classes and ``comfy.sample.sample_custom``."""
    sys.argv = [sys.argv[0]] + (["--cpu"] if device == "cpu" else [])
    sys.path.insert(0, str(comfy))
    import comfy.options

    comfy.options.enable_args_parsing()  # as ComfyUI's main.py does, so --cpu is read
    import torch
    from safetensors.torch import load_file, safe_open

    import comfy.model_detection as detection
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfy.sd

    detect = detection.detect_unet_config

    def detect_with_widths(state_dict, key_prefix, metadata=None):
        cfg_ = detect(state_dict, key_prefix, metadata=metadata)
        if cfg_ is not None and cfg_.get("image_model") == "qwen_image":
            inner, _ = state_dict[f"{key_prefix}img_in.weight"].shape
            head = state_dict[f"{key_prefix}transformer_blocks.0.attn.norm_q.weight"].shape[0]
            cfg_.update(attention_head_dim=head, num_attention_heads=inner // head,
                        joint_attention_dim=state_dict[f"{key_prefix}txt_in.weight"].shape[1],
                        out_channels=state_dict[f"{key_prefix}proj_out.weight"].shape[0] // 4)
        return cfg_
    detection.detect_unet_config = detect_with_widths
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    t0 = time.perf_counter()
    patcher = comfy.sd.load_diffusion_model(str(file), model_options={"dtype": torch_dtype})
    comfy.model_management.load_models_gpu([patcher])
    load = time.perf_counter() - t0
    x = load_file(str(inputs))
    with safe_open(str(inputs), "pt") as f:
        meta = f.metadata()
    size = int(meta["size"])
    ref = x["ref_raw"]
    positive = [[x["cond"], {"reference_latents": [ref]}]]
    negative = [[x["uncond"], {"reference_latents": [ref]}]]
    latent = torch.zeros_like(x["noise_unpacked"])
    # ComfyUI's noise lives in model space, as ours: the same packed noise, unpacked to ComfyUI's 5-D layout.
    noise = x["noise_unpacked"]
    sampler = comfy.samplers.sampler_object("euler")
    marks: list[float] = []
    _sync(device)
    start = time.perf_counter()
    out = comfy.sample.sample_custom(patcher, noise, cfg, sampler, x["sigmas"], positive, negative, latent,
                                     callback=lambda *a: (_sync(device), marks.append(time.perf_counter())),
                                     disable_pbar=True, seed=0)
    _sync(device)
    total = time.perf_counter() - start
    del size
    return {"side": "comfy", "load_s": load, "sample_s": total, "steps": _step_times(start, marks),
            "peak_rss_mb": peak_rss_mb(), "peak_vram_mb": _vram(device), "latent": out.float().flatten().tolist()}


def run_side(side: str, args, python: str) -> dict:
    cmd = [python, "-m", "benchmarks.vs_comfy", "--worker", side, "--comfy", str(args.comfy), "--work",
           str(args.work), "--cfg", str(args.cfg), "--device", args.device, "--dtype", args.dtype,
           "--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode:
        raise RuntimeError(f"{side} worker failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfy", type=Path, required=True, help="a ComfyUI checkout (its folder holding comfy/)")
    p.add_argument("--comfy-python", default=sys.executable, help="an interpreter with ComfyUI's requirements")
    p.add_argument("--work", type=Path, default=None, help="folder for the model, its ComfyUI file and inputs")
    p.add_argument("--cfg", type=float, default=4.0)
    add_run_arguments(p, size=512, steps=4, sides=("ours", "comfy"))
    args = p.parse_args(argv)
    if not (args.comfy / "comfy" / "sd.py").is_file():
        p.error(f"--comfy {args.comfy} is not a ComfyUI checkout (no comfy/sd.py in it)")
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        file, inputs = args.work / "transformer_comfy.safetensors", args.work / "inputs.safetensors"
        if args.worker == "ours":
            result = run_ours(file, inputs, args.cfg, args.device, args.dtype)
        else:
            result = run_comfy(args.comfy, file, inputs, args.cfg, args.device, args.dtype)
        print(json.dumps(result))
        return 0

    from firered_core.demo_models import build_model, default_demo_dir

    args.work = Path(args.work or default_demo_dir().with_name(f"vs-comfy-{args.preset}-{args.size}-{args.steps}"))
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(args.work / "model", args.preset)
    file = write_comfy_transformer(Path(model_dir), args.work / "transformer_comfy.safetensors")
    make_inputs(Path(model_dir), args.work, args.size, args.steps, args.device, args.dtype)
    del file
    runs: dict[str, list[dict]] = {"comfy": [], "ours": []}
    for _ in range(args.repeats):
        runs["comfy"].append(run_side("comfy", args, args.comfy_python))
        runs["ours"].append(run_side("ours", args, sys.executable))
    report(runs, args)
    return 0


def report(runs: dict[str, list[dict]], args) -> None:
    import torch

    best = {side: min(rs, key=lambda r: r["sample_s"]) for side, rs in runs.items()}
    c, o = best["comfy"], best["ours"]
    machine = platform.processor() or platform.machine()
    if args.device.startswith("cuda"):
        machine = f"{torch.cuda.get_device_name()} + {machine}"
    print(f"machine: {machine}, {os.cpu_count()} cpus, torch threads {args.threads}; preset {args.preset}, "
          f"1 reference, {args.size}x{args.size}, {args.steps} steps, true CFG {args.cfg}, {args.dtype} on "
          f"{args.device}; best of {args.repeats}")
    med = {side: sorted(r["steps"])[len(r["steps"]) // 2] for side, r in best.items()}
    rows = [("per step, median (s)", med["comfy"], med["ours"]),
            ("sampling, whole (s)", c["sample_s"], o["sample_s"]),
            ("peak RSS (MiB)", max(r["peak_rss_mb"] for r in runs["comfy"]),
             max(r["peak_rss_mb"] for r in runs["ours"])),
            ("load (s)", c["load_s"], o["load_s"])]
    if args.device.startswith("cuda"):
        rows.insert(3, ("peak VRAM (MiB)", c["peak_vram_mb"], o["peak_vram_mb"]))
    print(f"{'':<24}{'ComfyUI':>10}{'ours':>10}{'ours/ComfyUI':>14}")
    for label, a, b in rows:
        print(f"{label:<24}{a:>10.2f}{b:>10.2f}{b / a:>14.2f}")
    lc, lo = torch.tensor(c["latent"]), torch.tensor(o["latent"])
    rel = float((lo - lc).norm() / lc.norm())
    print(f"final latents, relative difference ours vs ComfyUI: {rel:.3g} (CFG rescale differs, see --help)")


if __name__ == "__main__":
    sys.exit(main())
