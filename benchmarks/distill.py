"""Few-step distillation: is the distilled N-step, CFG-off LoRA closer to the teacher's 40-step, CFG-4 edit than the
base model at N steps (with CFG 4, and with CFG off)? And how many transformer forward passes does each image cost?

CPU proof (the default): tiny random models of the real architecture, trained on real photographs (skimage.data)
and LFW faces with one set of instructions, measured on HELD-OUT photographs, faces and instructions never trained
on. Per model build and seed, a LoRA is distilled (its seed draws the LoRA's init and the teacher's noise) and the
held-out edits are sampled with noise drawn from that seed: each held-out item its own draw, ``--draws`` (3) draws
per item (:func:`draw_seeds`, :func:`noise_seed`); the table gives each side's PSNR / SSIM to the teacher's picture
and the gain of the student over each base setting, as the mean over seeds with the seed-to-seed standard deviation,
per build and pooled. Why several draws: on these random models the noise draw, not the picture, sets the output, and
it moves one edit's gain by ~0.25 dB (std), while LoRAs trained with different seeds, measured at the same noise,
agree to ~0.1 dB; with all items on one draw (as this script did before) the spread of the noise, not of the
distillation, decided the sigma ratio.

The demo tiny model predicts velocities ~0.02 in size (its zero-initialised output layers get 0.02 noise), so its
8- and 40-step pictures agree to ~48 dB and there is nothing to distil; the builds here scale those layers by
``GAIN`` (10) so that the ODE bends: 8 steps then miss the 40-step picture by ~30 dB, 4 steps by ~27 dB.

GPU mode (``--device cuda --preset full``): one distillation step of the full-size transformer (random weights of
the real shape, LoRA, bf16, gradient checkpointing) with its teacher path, timed, and the peak memory. It needs a
GPU with ~80 GB; it has not been run here (no GPU was available when it was written).

    python benchmarks/distill.py                      # the CPU table (12 runs of ~2 CPU-minutes each)
    python benchmarks/distill.py --device cuda --preset full --steps 8 --segments 2
    python benchmarks/distill.py --step-only --preset tiny --size 64   # the GPU mode's code path, on the CPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GAIN = 10.0  # scale of the tiny model's near-zero-initialised layers (see the docstring)
SIZE = 64
TRAIN_PICTURES = ("astronaut", "coffee", "rocket", "chelsea", "immunohistochemistry", "colorwheel")
HELD_OUT_PICTURES = ("hubble_deep_field", "retina", "camera", "clock")
TUNE_PICTURES = ("coins", "horse")  # the recipe (lr, training steps) was chosen on these, never on the held-out set
TRAIN_FACES, HELD_OUT_FACES, TUNE_FACES = range(0, 6), range(100, 104), range(50, 52)
TRAIN_PROMPTS = ("Make the sky purple", "Turn it into a pencil sketch", "Add falling snow",
                 "Make it look like night", "Give it a warm golden light", "Make the colours vivid")
HELD_OUT_PROMPTS = ("Change the colours to sepia", "Paint it in watercolour", "Make it look rainy",
                    "Turn it into a neon poster")
# The recipe (training/configs/distill_lora.yaml) at the proof's size: only sizes, steps and paths differ.
RECIPE = dict(lr=6e-3, lr_schedule="cosine", warmup_steps=0, weight_decay=0.0, grad_clip=1.0, batch_size=1,
              **{"lora.rank": 16, "lora.alpha": 16.0, "variants.text_drop": 0.0, "variants.cn_rate": 0.0,
                 "variants.inverse_rate": 0.0, "distill.enabled": True, "distill.teacher_steps": 40,
                 "distill.teacher_cfg": 4.0})


# -- material -------------------------------------------------------------------------------------------------
def lively_model(root: str | Path, seed: int) -> Path:
    """The tiny model of build ``seed`` with its near-zero-initialised layers scaled by :data:`GAIN`."""
    from firered_core.demo_models import build_components, save_model

    root = Path(root)
    stamp = root / ".lively.json"
    if stamp.exists() and json.loads(stamp.read_text()) == {"seed": seed, "gain": GAIN}:
        return root
    parts = build_components("tiny", seed)
    with torch.no_grad():
        for p in parts["transformer"].parameters():
            if p.abs().max() <= 0.1:
                p.mul_(GAIN)
    save_model(parts, root)
    stamp.write_text(json.dumps({"seed": seed, "gain": GAIN}))
    return root


def picture(name: str | int, size: int = SIZE):
    """A real photograph (skimage.data) or LFW face (an int), centre-cropped square, RGB, ``size`` pixels."""
    from PIL import Image
    from skimage import data

    arr = data.lfw_subset()[name] if isinstance(name, int) else getattr(data, name)()
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).astype(np.uint8)
    img = Image.fromarray(arr[..., :3] if arr.ndim == 3 else arr).convert("RGB")
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    return img.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)


def edit_rows(root: str | Path, pictures, prompts) -> Path:
    """Edit rows (source picture + instruction) in the trainer's JSONL layout, without target images (the teacher
    makes the targets)."""
    root = Path(root)
    (root / "edit" / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, name in enumerate(pictures):
        path = f"img/{i:03d}.png"
        picture(name).save(root / "edit" / path)
        lines.append(json.dumps({"source_image": path, "instruction": prompts[i % len(prompts)]}))
    (root / "edit" / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root


def held_out_items(tune: bool = False) -> list[tuple[object, str]]:
    """The held-out (picture, instruction) pairs; ``tune``: the separate tuning pairs."""
    pics = [*TUNE_PICTURES, *TUNE_FACES] if tune else [*HELD_OUT_PICTURES, *HELD_OUT_FACES]
    return [(p, HELD_OUT_PROMPTS[i % len(HELD_OUT_PROMPTS)]) for i, p in enumerate(pics)]


# -- training and measuring -----------------------------------------------------------------------------------
def distil(model_dir: Path, data: Path, out: Path, steps: int, train_steps: int, seed: int, **extra) -> Path:
    """Distil an N-step LoRA with the recipe at the proof's size; the ComfyUI-style export's path."""
    from firered_core.training.config import load_config
    from firered_core.training.trainer import train

    area = SIZE * SIZE
    cfg = load_config(None, model=str(model_dir), data=str(data), output_dir=str(out), steps=train_steps, seed=seed,
                      target_area=area, reference_area=area, vl_area=area, tracker=None, checkpoint_every=0,
                      resume=None, **{**RECIPE, "distill.steps": steps, "distill.schedule_tokens": area // 256,
                                      **extra})
    return train(cfg).exports["comfy"]


class ForwardCounter:
    """Counts transformer forward passes per image (rows of each call's batch)."""

    def __init__(self, transformer: torch.nn.Module):
        self.rows = 0
        self.handle = transformer.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.rows += int(kwargs["hidden_states"].shape[0])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / max(np.mean((a - b) ** 2), 1e-12)))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=-1, data_range=1.0, win_size=7))


SIDES = ("base_cfg", "base_nocfg", "student")


def noise_seed(seed: int, item: int) -> int:
    """The noise of held-out item ``item`` under seed ``seed``: its own draw per item (on these random models the
    noise, not the picture, sets the output, so items sharing one draw would be one sample, not ``len(items)``)."""
    return seed + 1000 * item


def measure(model_dir: Path, lora: Path, steps: int, seeds: int | list[int], items=None, teacher_steps: int = 40,
            teacher_cfg: float = 4.0) -> dict | list[dict]:
    """PSNR / SSIM to the teacher (``teacher_steps``, CFG ``teacher_cfg``) of the base at ``steps`` with that CFG
    (``base_cfg``) and with CFG off (``base_nocfg``), and of the distilled LoRA (its saved schedule, CFG off), over
    the held-out items, per noise seed (a list: the seeds sampled as one batch, one row each); plus forward passes
    per image of each side (batch rows per forward; both CFG branches run as one batch)."""
    from firered_core.lora import model_schedule, model_with_loras
    from firered_core.model import load_model
    from firered_core.pipeline import EditPipeline
    from firered_core.speed import RunSettings

    one = isinstance(seeds, int)
    seeds = [seeds] if one else list(seeds)
    base = load_model(model_dir)
    view, _ = model_with_loras(base, [lora])
    schedule = model_schedule(view)
    assert schedule is not None and schedule.steps == steps, schedule
    kw = dict(width=SIZE, height=SIZE, vl_area=SIZE * SIZE, vae_area=SIZE * SIZE, num_images=len(seeds))
    out = [{f"{side}_{m}": [] for side in SIDES for m in ("psnr", "ssim")} for _ in seeds]
    passes = {}
    for j, (pic, prompt) in enumerate(items or held_out_items()):
        img = [picture(pic)]
        kw["seed"] = [noise_seed(s, j) for s in seeds]

        def run(model, key, **edit):
            counter = ForwardCounter(model.transformer)
            try:
                res = EditPipeline(model, RunSettings(batched_cfg=True)).edit(img, prompt, **kw, **edit)
            finally:
                counter.handle.remove()
            passes[key] = counter.rows // len(seeds)
            return [np.asarray(i, dtype=np.float64) / 255 for i in res.images]

        teacher = run(base, "teacher", steps=teacher_steps, true_cfg=teacher_cfg)
        got = {"base_cfg": run(base, "base_cfg", steps=steps, true_cfg=teacher_cfg),
               "base_nocfg": run(base, "base_nocfg", steps=steps, true_cfg=1.0),
               "student": run(view, "student", steps=steps, true_cfg=schedule.true_cfg, sigmas=schedule.tensor())}
        for k in range(len(seeds)):
            for side, x in got.items():
                out[k][f"{side}_psnr"].append(psnr(x[k], teacher[k]))
                out[k][f"{side}_ssim"].append(ssim(x[k], teacher[k]))
    rows = [{**{key: float(np.mean(v)) for key, v in o.items()}, "passes": dict(passes)} for o in out]
    return rows[0] if one else rows


def draw_seeds(seed: int, draws: int) -> list[int]:
    """The noise seeds one trained LoRA is measured with: ``draws`` per held-out item (see :func:`noise_seed`)."""
    return [seed + 100 * d for d in range(draws)]


def averaged(rows: list[dict]) -> dict:
    """One row of :func:`measure` per noise draw -> their mean (the run's estimate of each metric)."""
    keys = [k for k in rows[0] if k != "passes"]
    return {**{k: float(np.mean([r[k] for r in rows])) for k in keys}, "passes": rows[0]["passes"]}


def gains(rows: list[dict]) -> dict:
    """Per metric and base side: mean and seed-to-seed std (ddof 1) of student minus base, over ``rows``."""
    out = {}
    for metric in ("psnr", "ssim"):
        for side in ("base_cfg", "base_nocfg"):
            d = np.array([r[f"student_{metric}"] - r[f"{side}_{metric}"] for r in rows])
            out[f"{metric}_vs_{side}"] = (float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else math.nan)
    return out


# -- the CPU table ----------------------------------------------------------------------------------------------
def cpu_table(args) -> None:
    torch.set_num_threads(args.threads)
    if args.aggregate:
        rows = [r for f in args.aggregate for r in json.loads(Path(f).read_text())]
        for steps in sorted({r["steps"] for r in rows}, reverse=True):
            print_table([r for r in rows if r["steps"] == steps], steps)
        return
    work = Path(args.work)
    data = edit_rows(work / "train", [*TRAIN_PICTURES, *TRAIN_FACES], TRAIN_PROMPTS)
    which = "TUNING pairs" if args.tune else "held-out pairs (pictures and prompts never trained on)"
    print(f"# distillation, CPU ({args.threads} threads), tiny models x{GAIN:g}, {SIZE}x{SIZE}, lr {args.lr:g}, "
          f"{args.train_steps} training steps; measured on {len(held_out_items(args.tune))} {which}")
    done = []
    for steps in args.student_steps:
        rows = []
        for build in args.builds:
            model_dir = lively_model(work / f"model{build}", build)
            for seed in args.seeds:
                t = time.perf_counter()
                lora = distil(model_dir, data, work / f"run-b{build}-s{seed}-n{steps}", steps, args.train_steps, seed,
                              lr=args.lr)
                draws = measure(model_dir, lora, steps, draw_seeds(seed, args.draws), held_out_items(args.tune))
                r = averaged(draws)
                r.update(build=build, seed=seed, steps=steps, draw_gains_psnr=[
                    d["student_psnr"] - d["base_cfg_psnr"] for d in draws])
                rows.append(r)
                print(f"build {build} seed {seed} N={steps}: " + ", ".join(
                    f"{s} {r[s + '_psnr']:.2f} dB / {r[s + '_ssim']:.4f}" for s in SIDES)
                    + f"  ({time.perf_counter() - t:.0f} s)", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(done + rows))
        done += rows
        print_table(rows, steps)


def print_table(rows: list[dict], steps: int) -> None:
    p = rows[-1]["passes"]
    builds, seeds = sorted({r.get("build") for r in rows}), sorted({r.get("seed") for r in rows})
    print(f"\nN={steps}: builds {builds}, seeds {seeds} (mean ± seed-to-seed std over {len(rows)} runs)")
    print("| side | PSNR to teacher (dB) | SSIM to teacher | forward passes / image |")
    print("|---|---|---|---|")
    print(f"| teacher, 40 steps, CFG 4 | - | - | {p['teacher']} |")
    for side, label in (("base_cfg", f"base, {steps} steps, CFG 4"), ("base_nocfg", f"base, {steps} steps, CFG off"),
                        ("student", f"distilled LoRA, {steps} steps, CFG off")):
        ps, ss = np.array([r[side + "_psnr"] for r in rows]), np.array([r[side + "_ssim"] for r in rows])
        print(f"| {label} | {ps.mean():.2f} ± {ps.std(ddof=1):.2f} | {ss.mean():.4f} ± {ss.std(ddof=1):.4f} "
              f"| {p[side]} |")
    per_build = {b: gains([r for r in rows if r.get("build") == b]) for b in builds}
    for build, g in per_build.items():
        for key, (m, s) in g.items():
            print(f"build {build}: gain {key}: {m:+.4f} (seed-to-seed std {s:.4f}, "
                  f"{m / s if s > 0 else math.inf:.1f} sigma)")
    for key, (m, across) in gains(rows).items():  # pooled: the within-build seed spread, sqrt(mean of variances)
        s = math.sqrt(np.mean([g[key][1] ** 2 for g in per_build.values()]))
        print(f"pooled ({len(rows)} runs): gain {key}: {m:+.4f} (pooled seed-to-seed std {s:.4f}, "
              f"{m / s if s > 0 else math.inf:.1f} sigma; std over all runs, builds' difference included, "
              f"{across:.4f}, {m / across if across > 0 else math.inf:.1f} sigma)")
    print()


# -- the GPU script ---------------------------------------------------------------------------------------------
def gpu_step(args) -> None:
    """Time one full-size distillation step (teacher path + student update) and report the peak memory."""
    from firered_core.demo_models import transformer_config
    from firered_core.sampling import SCHEDULER_CONFIG
    from firered_core.training.distill import DistillConfig, distill_loss, student_sigmas, teacher_path
    from firered_core.conditioning import PromptEmbeds
    from firered_core.sampling import transformer_denoiser
    from firered_core.training.preference import adapters_disabled
    from diffusers import QwenImageTransformer2DModel
    from peft import LoraConfig

    from firered_core.training.config import LORA_TARGETS

    device = torch.device(args.device)
    dtype = torch.bfloat16
    if args.preset == "full":
        config = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                      num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                      axes_dims_rope=(16, 56, 56))
    else:
        config = transformer_config(args.preset)
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**config).to(dtype)
    model = model.to_empty(device=device)  # bf16 from the start: the full model is ~41 GB
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    model.pos_embed = QwenEmbedRope(theta=10000, axes_dim=list(config["axes_dims_rope"]), scale_rope=True)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=list(LORA_TARGETS)))
    model.enable_gradient_checkpointing()
    model.train()
    side = args.size // 16  # tokens per side
    tokens = side * side
    cfg = DistillConfig(enabled=True, steps=args.steps, teacher_steps=args.teacher_steps,
                        schedule_tokens=tokens, segments=args.segments)
    sig = student_sigmas(cfg, SCHEDULER_CONFIG)
    gen = torch.Generator().manual_seed(0)
    text = config["joint_attention_dim"]
    cond = PromptEmbeds(torch.randn(1, 200, text, generator=gen).to(device, dtype), None)
    uncond = PromptEmbeds(torch.randn(1, 180, text, generator=gen).to(device, dtype), None)
    from firered_core.references import RefLatents

    ref = RefLatents(torch.randn(1, tokens, 64, generator=gen).to(device, dtype), [(1, side, side)])
    shapes = [[(1, side, side), (1, side, side)]]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for it in range(args.repeats + 1):
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        noise = torch.randn(1, tokens, 64, generator=gen).to(device, dtype)
        with adapters_disabled(model), torch.no_grad():
            states = teacher_path(transformer_denoiser(model, ref, shapes), noise, sig, cfg.teacher_steps //
                                  cfg.steps, cond, uncond, cfg.teacher_cfg)
        t_teacher = time.perf_counter() - t
        seg = torch.arange(cfg.steps)[: cfg.segments or cfg.steps]
        n = len(seg)
        v = transformer_denoiser(model, ref, shapes)(states[seg], sig[seg].to(device, dtype),
                                                     PromptEmbeds(cond.embeds.expand(n, -1, -1), None), "cond")
        loss = distill_loss(v, states, sig, seg)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        if it:  # the first step warms up
            times.append((time.perf_counter() - t, t_teacher))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    best = min(times)
    print(f"| {args.preset} | {args.size}x{args.size} | N={args.steps}, teacher {args.teacher_steps} x CFG "
          f"| {n} segments | {best[0]:.2f} s/step (teacher {best[1]:.2f} s) | peak {peak:.1f} GiB |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", default=os.environ.get("FIRERED_BENCH_DIR", "/tmp/firered-distill-bench"))
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--builds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--student-steps", type=int, nargs="+", default=[8, 4])
    p.add_argument("--train-steps", type=int, default=60)
    p.add_argument("--draws", type=int, default=3, help="noise draws per held-out item and seed")
    p.add_argument("--lr", type=float, default=RECIPE["lr"])
    p.add_argument("--json", help="write the per-run rows here (as they come)")
    p.add_argument("--aggregate", nargs="+", help="print the tables of these --json files and stop")
    p.add_argument("--tune", action="store_true", help="measure on the tuning pairs instead of the held-out ones")
    # GPU mode
    p.add_argument("--preset", default="full", help="GPU mode: full (the real shape) or a demo preset")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--teacher-steps", type=int, default=40)
    p.add_argument("--segments", type=int, default=2)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--step-only", action="store_true", help="the GPU mode's step on the CPU (a smoke test)")
    args = p.parse_args(argv)
    if args.device == "cpu" and not args.step_only:
        cpu_table(args)
    else:
        gpu_step(args)


if __name__ == "__main__":
    main()
