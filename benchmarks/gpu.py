"""GPU benchmark of the full-size architecture with random weights: one table, every option in its own try.

    python -m benchmarks.gpu                      # 60 layers, 24x128, text dim 3584, bf16, 1024², 1 ref
    python -m benchmarks.gpu --layers 2 --size 128 --device cpu   # smoke run on a CPU

Columns: seconds per transformer forward, its fraction of the card's dense bf16 peak (analytic FLOPs), peak device
memory of that option, end-to-end seconds for 8 steps without CFG (VAE encode of the reference + sampling + VAE
decode; no text encoder: random prompt embeddings of a realistic length) and the PSNR of that decoded image against
the plain path's (same seed). Rows print as they finish, so a run cut short still reports what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback

import numpy as np
import torch

from benchmarks._common import cell, full_size_transformer, psnr, reset_peak, sync
from benchmarks._common import peak_vram_gib as peak_gib

PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0,
                    "4090": 165.0}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def forward_flops(layers: int, dim: int, tokens: int, text_dim: int, txt: int) -> float:
    """Dense FLOPs of one forward: per block 12 d² MACs per token (QKV, out, 4x MLP) + joint attention."""
    per_block = 2 * 12 * dim * dim * tokens + 2 * 2 * tokens * tokens * dim
    return layers * per_block + 2 * txt * text_dim * dim


def build_vae(device, dtype):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    return AutoencoderKLQwenImage().to(device=device, dtype=dtype).eval().requires_grad_(False)


class Bench:
    def __init__(self, args):
        from PIL import Image

        from firered_core.references import prepare_references

        self.args = args
        self.device = torch.device(args.device)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        rs = np.random.RandomState(0)
        image = Image.fromarray((rs.rand(args.size, args.size, 3) * 255).astype(np.uint8))
        self.refs = prepare_references([image], vae_area=args.size * args.size)
        gen = torch.Generator().manual_seed(1)
        self.txt = torch.randn(1, args.txt_len, args.text_dim, generator=gen).to(self.device, self.dtype)
        self.vae = build_vae(self.device, self.dtype)
        self.rows: list[dict] = []
        self.reference_image = None
        self.tokens = 2 * (args.size // 16) ** 2 + args.txt_len
        self.flops = forward_flops(args.layers, args.heads * 128, self.tokens, args.text_dim, args.txt_len)
        self.peak = peak_tflops(self.device, args.peak_tflops)

    def inputs(self):
        from firered_core import latents as L
        from firered_core.references import encode_references

        ref = encode_references(self.vae, self.refs, device=self.device, dtype=self.dtype)
        shapes = [[L.token_grid(self.args.size, self.args.size), *ref.shapes]]
        return ref, shapes

    def forward_seconds(self, tr, ref, shapes, repeats: int) -> float:
        from firered_core.pipeline import make_noise
        from firered_core.sampling import transformer_denoiser
        from firered_core.conditioning import PromptEmbeds

        x = make_noise(1, self.args.size, self.args.size, 0, self.dtype, self.device)
        den = transformer_denoiser(tr, ref, shapes)
        t = torch.full((1,), 0.5, device=self.device, dtype=self.dtype)
        cond = PromptEmbeds(self.txt, None)
        with torch.no_grad():
            den(x, t, cond, "cond")
            sync(self.device)
            start = time.perf_counter()
            for _ in range(repeats):
                den(x, t, cond, "cond")
            sync(self.device)
        return (time.perf_counter() - start) / repeats

    def end_to_end(self, tr, block_cache=None) -> tuple[float, torch.Tensor, dict | None]:
        from firered_core.conditioning import PromptEmbeds
        from firered_core.pipeline import decode_latents, make_noise
        from firered_core.sampling import make_sigmas, sample, transformer_denoiser
        from firered_core.sampling import SCHEDULER_CONFIG

        sync(self.device)
        start = time.perf_counter()
        with torch.no_grad():
            ref, shapes = self.inputs()
            x = make_noise(1, self.args.size, self.args.size, 0, self.dtype, self.device)
            sigmas = make_sigmas(self.args.steps, x.shape[1], SCHEDULER_CONFIG)
            den = transformer_denoiser(tr, ref, shapes, block_cache=block_cache)
            out = sample(den, x, sigmas, PromptEmbeds(self.txt, None))
            image = decode_latents(self.vae, out, self.args.size, self.args.size)
        sync(self.device)
        report = block_cache.report() if block_cache is not None else None
        return time.perf_counter() - start, image.float().cpu(), report

    def psnr(self, image: torch.Tensor) -> float | None:
        if self.reference_image is None:
            return None
        return psnr(image, self.reference_image)

    def row(self, name: str, tr, forward: bool = True, block_cache=None, note: str = "",
            repeats: int | None = None, extra: dict | None = None):
        """One table row: forward timing (unless ``forward`` is False) and the 8-step end-to-end run."""
        row = {"option": name, "note": note, **(extra or {})}
        if forward:
            reset_peak(self.device)
            ref, shapes = self.inputs()
            sec = self.forward_seconds(tr, ref, shapes, repeats or self.args.repeats)
            row.update({"s/forward": sec, "peak": peak_gib(self.device), "tflops": self.flops / sec / 1e12})
            if self.peak:
                row["util"] = self.flops / sec / (self.peak * 1e12)
        reset_peak(self.device)
        seconds, image, report = self.end_to_end(tr, block_cache)
        row["e2e"] = seconds
        row["peak"] = max(row.get("peak") or 0, peak_gib(self.device) or 0) or None
        row["psnr"] = self.psnr(image)
        if self.reference_image is None:
            self.reference_image = image
        if report:
            diffs = [d for b in report["branches"].values() for d in b["diffs"]]
            seen = f" diffs {min(diffs):.3f}..{max(diffs):.3f}" if diffs else ""
            row["note"] = (note + f" blocks {report['computed']}/{report['total']}{seen}").strip()
        self.rows.append(row)
        print_row(row)

    def attempt(self, name: str, fn) -> None:
        try:
            with torch.no_grad():
                fn()
        except Exception as exc:  # noqa: BLE001 - a benchmark reports every failure and goes on
            traceback.print_exc(limit=3)
            row = {"option": name, "note": f"ERROR {type(exc).__name__}: {str(exc)[:80]}"}
            self.rows.append(row)
            print_row(row)
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


HEADER = (f"{'option':<30}{'s/fwd':>7}{'TFLOP/s':>8}{'util':>6}{'peak GiB':>9}{'e2e s':>7}{'PSNR':>6}"
          f"{'compile s':>10}  note")
# The numbers in docs/benchmarks.md (H100 80GB, torch 2.11): option -> (s/forward, 8-step end-to-end s).
TODAY = {"plain": (0.39, 3.33), "compile": (0.31, 2.63), "int8 weights": (0.49, 4.07), "fp8 weights": (0.50, 4.14)}


def print_row(row: dict) -> None:
    print(f"{row['option']:<30}{cell(row.get('s/forward'), '7.3f')}{cell(row.get('tflops'), '8.0f')}"
          f"{cell(row.get('util'), '6.0%')}{cell(row.get('peak'), '9.1f')}{cell(row.get('e2e'), '7.2f')}"
          f"{cell(row.get('psnr'), '6.1f')}{cell(row.get('compile_s'), '10.0f')}  {row.get('note', '')}", flush=True)


OPTIONS = ("plain", "kernels", "attention", "sage", "fp8", "int8", "compile", "compile-fp8", "compile-int8",
           "cudagraphs",
           "autotune", "cfg40", "cache", "swap", "weights-only")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=60)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--text-dim", type=int, default=3584)
    p.add_argument("--size", type=int, default=1024, help="output and reference side in pixels")
    p.add_argument("--txt-len", type=int, default=240, help="prompt embedding length (incl. VL image tokens)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--cfg-steps", type=int, default=40, help="steps of the true-CFG row (cfg40)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--resident", type=int, default=8, help="blocks kept on the device with block swap")
    p.add_argument("--cache-thresholds", default="0.1,0.3", help="comma-separated block cache thresholds")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"))
    p.add_argument("--device", default=None)
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the card (auto for known)")
    p.add_argument("--options", default="plain,kernels,attention,sage,fp8,int8,compile,compile-fp8,cfg40,cudagraphs,"
                                        "autotune", help=f"comma-separated subset of {','.join(OPTIONS)}")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: smoke runs)")
    p.add_argument("--deadline", type=float, default=0, help="skip the options not started after this many s")
    p.add_argument("--out", default=None, help="also write the rows as JSON lines to this file")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    wanted = [o for o in args.options.split(",") if o]
    unknown = sorted(set(wanted) - set(OPTIONS))
    if unknown:
        p.error(f"unknown options {unknown}; known: {OPTIONS}")
    total = time.perf_counter()

    from benchmarks import gpu_kernels
    from firered_core.block_cache import BlockCache, BlockCacheConfig
    from firered_core.kernels.attention import resolve, sage_installed, set_attention_backend
    from firered_core.memory import BlockSwap, quantize_transformer, weight_bytes
    from firered_core.speed import compile_blocks

    bench = Bench(args)
    device = bench.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    best_attention = resolve("auto", device)
    print(f"device {name}; torch {torch.__version__}; {args.layers} layers, {args.heads}x128, text dim "
          f"{args.text_dim}, {args.dtype}, {args.size}² output + 1 reference ({bench.tokens} tokens), {args.steps} "
          f"steps no CFG; {bench.flops / 1e12:.1f} TFLOP per forward; bf16 peak {bench.peak or '?'} TFLOP/s "
          f"(fp8 peak twice that); auto attention = {best_attention}", flush=True)
    thresholds = [float(v) for v in args.cache_thresholds.split(",") if v]
    out = open(args.out, "a") if args.out else None

    def emit(row: dict) -> None:
        if out is not None:
            out.write(json.dumps(row) + "\n")
            out.flush()

    def cache_config(threshold: float) -> BlockCacheConfig:
        return BlockCacheConfig(threshold=threshold, first=2, last=2, warmup=2, max_consecutive=2, taylorseer=True)
    state: dict = {}

    def fresh(attention: str = "sdpa", quant: str = "none"):
        state.pop("tr", None)
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        tr = full_size_transformer(args.layers, args.heads, args.text_dim, args.seed, device, bench.dtype)
        count = quantize_transformer(tr, quant)
        if attention != "sdpa":
            set_attention_backend(tr, attention, device)
        state["tr"] = tr
        return tr, count

    def row(label: str, tr, **kw):
        bench.row(label, tr, **kw)
        emit(bench.rows[-1])

    def compiled_row(label: str, attention: str, quant: str = "none", mode: str | None = None, note: str = ""):
        tr, count = fresh(attention, quant)
        ref, shapes = bench.inputs()
        start = time.perf_counter()
        if args.compile_backend == "inductor":
            compile_blocks(tr, mode=mode)
        else:
            compile_blocks(tr, backend=args.compile_backend)
        bench.forward_seconds(tr, ref, shapes, 1)
        bench.forward_seconds(tr, ref, shapes, 1)  # CUDA graphs record on the second call
        compile_s = time.perf_counter() - start
        row(label, tr, note=(note + (f" {count} fp8/int8 linears" if count else "")).strip(),
            extra={"compile_s": compile_s})
        return tr

    def run_cfg40(tr, label: str):
        from firered_core.conditioning import PromptEmbeds
        from firered_core.pipeline import decode_latents, make_noise
        from firered_core.sampling import SCHEDULER_CONFIG, make_sigmas, sample, transformer_denoiser

        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            ref, shapes = bench.inputs()
            x = make_noise(1, args.size, args.size, 0, bench.dtype, device)
            sigmas = make_sigmas(args.cfg_steps, x.shape[1], SCHEDULER_CONFIG)
            den = transformer_denoiser(tr, ref, shapes)
            neg = PromptEmbeds(bench.txt[:, : args.txt_len // 4], None)
            lat = sample(den, x, sigmas, PromptEmbeds(bench.txt, None), neg, true_cfg=4.0)
            decode_latents(bench.vae, lat, args.size, args.size)
        sync(device)
        r = {"option": label, "e2e": time.perf_counter() - start, "peak": peak_gib(device),
             "note": f"{args.cfg_steps} steps, true CFG 4 (2 forwards / step)"}
        bench.rows.append(r)
        print_row(r)
        emit(r)

    def attention_micro():
        rows = gpu_kernels.attention_table(bench.tokens, args.heads, device, bench.dtype)
        gpu_kernels.print_attention(rows)
        g = gpu_kernels.gguf_table(bench.tokens, [(4 * args.heads * 128, args.heads * 128),
                                                 (args.heads * 128, 4 * args.heads * 128)], device, bench.dtype)
        gpu_kernels.print_gguf(g)
        for r in rows + g:
            emit({"micro": True, **r})
        print(HEADER, flush=True)

    steps = {
        "plain": lambda: row("plain (sdpa)", fresh()[0], note=f"weights {weight_bytes(state['tr']) / 2**30:.1f} GiB"),
        "kernels": attention_micro,
        "attention": lambda: [row(f"attention {b}", fresh(b)[0]) for b in ("flash", "cudnn", "efficient")],
        "sage": lambda: row("attention sage", fresh("sage")[0]) if sage_installed() else print("sage: not installed"),
        "fp8": lambda: row(f"fp8_mm eager, {best_attention}", fresh(best_attention, "fp8_mm")[0],
                           note="fp8 _scaled_mm, per-token act. scales"),
        "int8": lambda: row(f"int8_mm eager, {best_attention}", fresh(best_attention, "int8_mm")[0],
                            note="int8 _int_mm, per-token act. scales"),
        "weights-only": lambda: row("fp8 weight-only (today)", fresh("sdpa", "fp8")[0]),
        "compile": lambda: compiled_row(f"compile, {best_attention}", best_attention),
        "compile-fp8": lambda: compiled_row(f"compile fp8_mm, {best_attention}", best_attention, "fp8_mm"),
        "compile-int8": lambda: compiled_row(f"compile int8_mm, {best_attention}", best_attention, "int8_mm"),
        "cudagraphs": lambda: compiled_row(f"compile+CUDA graphs, {best_attention}", best_attention,
                                           mode="reduce-overhead"),
        "autotune": lambda: compiled_row(f"compile max-autotune-no-cg", best_attention,
                                         mode="max-autotune-no-cudagraphs"),
        "cfg40": lambda: run_cfg40(state.get("compiled_bf16")
                                   or compiled_row(f"compile, {best_attention}", best_attention),
                                   f"{args.cfg_steps} steps true CFG, compiled"),
        "cache": lambda: [row(f"cache {th}+taylor", state.get("tr") or fresh()[0], forward=False,
                              block_cache=BlockCache(cache_config(th))) for th in thresholds],
    }

    def swap():
        tr = fresh()[0]
        swapper = BlockSwap(tr, args.resident, device)
        try:
            row(f"block swap {args.resident} res.", tr, repeats=1)
        finally:
            swapper.remove()
            state.pop("tr", None)
    steps["swap"] = swap
    if "compile" in wanted:
        plain_compile = steps["compile"]

        def keep_compiled():
            state["compiled_bf16"] = plain_compile()
        steps["compile"] = keep_compiled
        if "cfg40" in wanted:  # the 40-step CFG row reuses the compiled bf16 model: run it right after
            wanted.remove("cfg40")
            wanted.insert(wanted.index("compile") + 1, "cfg40")

    print(HEADER, flush=True)
    for option in wanted:
        if args.deadline and time.perf_counter() - total > args.deadline:
            print(f"{option}: skipped (past the {args.deadline:.0f} s deadline)", flush=True)
            continue
        bench.attempt(option, steps[option])
        if option == "cfg40":
            state.pop("compiled_bf16", None)
    state.clear()
    print_summary(bench.rows, args)
    print(f"total {time.perf_counter() - total:.0f} s", flush=True)
    if out is not None:
        out.close()


def print_summary(rows: list[dict], args) -> None:
    """Every row again (the reply of a remote run keeps only the end), today's numbers and the issue's targets."""
    print("\n== summary ==")
    print(HEADER)
    for r in rows:
        print_row(r)
    print("docs/benchmarks.md (H100, torch 2.11): " + ", ".join(f"{k} {v[0]:.2f} s/fwd {v[1]:.2f} s e2e"
                                                         for k, v in TODAY.items()))
    plain = next((r for r in rows if r["option"].startswith("plain")), {})
    comp = next((r for r in rows if r["option"].startswith("compile, ")), {})
    fp8 = next((r for r in rows if r["option"].startswith("compile fp8_mm")), {})
    cfg = next((r for r in rows if "true CFG" in r["option"]), {})
    print(f"targets ({args.steps} steps unless said): bf16 <= 2.0 s: plain {plain.get('e2e', '-')}, compiled "
          f"{comp.get('e2e', '-')}; fp8 <= 1.4 s at PSNR >= 35: {fp8.get('e2e', '-')} at {fp8.get('psnr', '-')} dB; "
          f"40 steps true CFG <= 20 s: {cfg.get('e2e', '-')}; fp8 peak <= 24 GB: "
          f"{fp8.get('peak', '-')} GiB")


if __name__ == "__main__":
    sys.exit(main())
