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
            repeats: int | None = None):
        """One table row: forward timing (unless ``forward`` is False) and the 8-step end-to-end run."""
        row = {"option": name, "note": note}
        if forward:
            reset_peak(self.device)
            ref, shapes = self.inputs()
            sec = self.forward_seconds(tr, ref, shapes, repeats or self.args.repeats)
            row.update({"s/forward": sec, "peak": peak_gib(self.device)})
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
            fn()
        except Exception as exc:  # noqa: BLE001 - a benchmark reports every failure and goes on
            traceback.print_exc(limit=3)
            row = {"option": name, "note": f"ERROR {type(exc).__name__}: {str(exc)[:80]}"}
            self.rows.append(row)
            print_row(row)
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


HEADER = f"{'option':<22}{'s/fwd':>8}{'util':>7}{'peak GiB':>10}{'e2e s':>8}{'PSNR':>7}  note"


def print_row(row: dict) -> None:
    print(f"{row['option']:<22}{cell(row.get('s/forward'), '8.3f')}{cell(row.get('util'), '7.1%')}"
          f"{cell(row.get('peak'), '10.1f')}{cell(row.get('e2e'), '8.2f')}{cell(row.get('psnr'), '7.1f')}"
          f"  {row.get('note', '')}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=60)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--text-dim", type=int, default=3584)
    p.add_argument("--size", type=int, default=1024, help="output and reference side in pixels")
    p.add_argument("--txt-len", type=int, default=240, help="prompt embedding length (incl. VL image tokens)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--resident", type=int, default=8, help="blocks kept on the device with block swap")
    p.add_argument("--cache-thresholds", default="0.1,0.3", help="comma-separated block cache thresholds")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"))
    p.add_argument("--device", default=None)
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the card (auto for known)")
    p.add_argument("--options", default="plain,cache,int8,fp8,swap,compile",
                   help="comma-separated subset of plain,cache,int8,fp8,swap,compile")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    wanted = set(args.options.split(","))
    total = time.perf_counter()

    from firered_core.cache import BlockCache, BlockCacheConfig
    from firered_core.memory import BlockSwap, quantize_transformer, weight_bytes
    from firered_core.speed import compile_blocks

    bench = Bench(args)
    device = bench.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}; {args.layers} layers, {args.heads}x128, text dim {args.text_dim}, {args.dtype}, "
          f"{args.size}² output + 1 reference ({bench.tokens} tokens), {args.steps} steps no CFG; "
          f"{bench.flops / 1e12:.1f} TFLOP per forward; peak {bench.peak or '?'} TFLOPS")
    print(HEADER, flush=True)
    thresholds = [float(v) for v in args.cache_thresholds.split(",") if v]

    def cache_config(threshold: float) -> BlockCacheConfig:
        return BlockCacheConfig(threshold=threshold, first=2, last=2, warmup=2, max_consecutive=2, taylorseer=True)
    state: dict = {}

    def fresh():
        state.pop("tr", None)
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        state["tr"] = full_size_transformer(args.layers, args.heads, args.text_dim, args.seed, device,
                                             bench.dtype)
        return state["tr"]

    def plain():
        tr = fresh()
        bench.row("plain", tr, note=f"weights {weight_bytes(tr) / 2**30:.1f} GiB")

    bench.attempt("plain", plain)
    if "cache" in wanted:
        for th in thresholds:
            bench.attempt(f"cache {th}+taylor", lambda th=th: bench.row(
                f"cache {th}+taylor", state.get("tr") or fresh(), forward=False,
                block_cache=BlockCache(cache_config(th))))
    if "swap" in wanted:
        def swap():
            tr = state.get("tr") or fresh()
            swapper = BlockSwap(tr, args.resident, device)
            try:
                bench.row(f"block swap {args.resident} res.", tr, repeats=1)
            finally:
                swapper.remove()
                state.pop("tr", None)
        bench.attempt("block swap", swap)
    for mode in ("int8", "fp8"):
        if mode in wanted:
            def quant(mode=mode):
                tr = fresh()
                count = quantize_transformer(tr, mode)
                bench.row(f"{mode} weights", tr, note=f"{count} linears, {weight_bytes(tr) / 2**30:.1f} GiB")
                state.pop("tr", None)
            bench.attempt(mode, quant)
    if "compile" in wanted:
        def compiled():
            tr = state.get("tr") or fresh()
            ref, shapes = bench.inputs()
            start, note = time.perf_counter(), ""
            try:
                compile_blocks(tr)
                bench.forward_seconds(tr, ref, shapes, 1)
            except Exception as exc:  # noqa: BLE001 - report the graph break, then measure without fullgraph
                print(f"fullgraph compile failed ({type(exc).__name__}: {str(exc)[:200]}); retrying without",
                      flush=True)
                torch._dynamo.reset()
                compile_blocks(tr, fullgraph=False)
                bench.forward_seconds(tr, ref, shapes, 1)
                note = "fullgraph=False "
            note += f"compile {time.perf_counter() - start:.0f} s"
            bench.row("compile", tr, note=note)
            bench.row(f"compile+cache {thresholds[-1]}", tr, forward=False,
                      block_cache=BlockCache(cache_config(thresholds[-1])))
            state.pop("tr", None)
        bench.attempt("compile", compiled)
    print(f"total {time.perf_counter() - total:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
