"""Kernel micro-benchmarks for benchmarks/gpu.py: joint attention per backend (time and error against a float32
reference) and runtime GGUF linears against a bf16 Linear (eager decode, compiled decode).

    python -m benchmarks.gpu_kernels --device cpu --tokens 256 --dim 256     # smoke run on a CPU
"""

from __future__ import annotations

import argparse
import time

import torch


def timed(fn, device: torch.device, repeats: int = 10) -> float:
    """Median seconds of ``fn()`` after two warm-up calls (CUDA events on a GPU)."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def attention_table(tokens: int, heads: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Each attention kernel alone at the joint attention's shape; error vs a float32 (math) reference."""
    from torch.nn.attention import sdpa_kernel

    from firered_core.kernels.attention import SDPA_KERNELS, sage_installed

    gen = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, tokens, 128, device=device, dtype=dtype, generator=gen) for _ in range(3))
    with sdpa_kernel([SDPA_KERNELS["math"]]):
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    flops = 4 * tokens * tokens * 128 * heads
    rows = []
    candidates = {name: (lambda kern=kern: _sdpa(q, k, v, kern)) for name, kern in SDPA_KERNELS.items()
                  if name != "math"}
    if sage_installed() and device.type == "cuda":
        from sageattention import sageattn

        candidates["sage"] = lambda: sageattn(q, k, v, tensor_layout="HND", is_causal=False)
    for name, fn in candidates.items():
        try:
            out = fn()
            sec = timed(fn, device)
            rows.append({"kernel": name, "ms": sec * 1e3, "tflops": flops / sec / 1e12, "rel_err": rel(out, ref)})
        except Exception as exc:  # noqa: BLE001 - a kernel this device lacks is a row, not a crash
            rows.append({"kernel": name, "error": f"{type(exc).__name__}: {str(exc)[:70]}"})
    return rows


def _sdpa(q, k, v, kernel):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([kernel]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def q8_0_bytes(w: torch.Tensor) -> torch.Tensor:
    """Quantise ``w`` [N, K] to GGUF Q8_0 bytes (fp16 scale + 32 int8 per block), on its device."""
    blocks = w.float().reshape(-1, 32)
    scale = (blocks.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)
    q = (blocks / scale).round().clamp(-127, 127).to(torch.int8)
    return torch.cat([scale.half().view(torch.uint8), q.view(torch.uint8)], 1).reshape(w.shape[0], -1)


def q4_k_bytes(n: int, k: int, device: torch.device) -> torch.Tensor:
    """Random Q4_K bytes with small valid fp16 super-block scales (timing and decode parity; not a real model)."""
    gen = torch.Generator(device).manual_seed(1)
    raw = torch.randint(0, 256, (n * k // 256, 144), device=device, dtype=torch.uint8, generator=gen)
    scales = (torch.rand(n * k // 256, 2, device=device, generator=gen) * 1e-3).half().view(torch.uint8)
    raw[:, :4] = scales.reshape(-1, 4)
    return raw.reshape(n, -1)


def gguf_table(tokens: int, shapes: list[tuple[int, int]], device: torch.device, dtype: torch.dtype) -> list[dict]:
    """bf16 Linear vs GGUFLinear (eager decode; compiled decode on CUDA) for Q8_0 and Q4_K, per weight shape."""
    from firered_core.formats.gguf.kernels import dequantize
    from firered_core.formats.gguf.linear import GGUFLinear
    from firered_core.kernels.gguf_fast import fast_dequantize

    rows = []
    gen = torch.Generator(device).manual_seed(0)
    for m in (tokens, 2):
        x = torch.randn(m, shapes[0][1], device=device, dtype=dtype, generator=gen)
        for n, k in shapes:
            if x.shape[1] != k:
                x = torch.randn(m, k, device=device, dtype=dtype, generator=gen)
            w = torch.randn(n, k, device=device, dtype=dtype, generator=gen) / k ** 0.5
            base = timed(lambda: torch.nn.functional.linear(x, w), device)
            for qname, qtype, packed in (("Q8_0", 8, q8_0_bytes(w)), ("Q4_K", 12, q4_k_bytes(n, k, device))):
                layer = GGUFLinear(packed.reshape(-1), qtype, n, k, dtype=dtype).to(device)
                eager = timed(lambda: torch.nn.functional.linear(
                    x, dequantize(layer.qweight, qtype, (n, k), dtype)), device)
                fast = timed(lambda: layer(x), device)
                err = rel(fast_dequantize(layer.qweight, qtype, (n, k), torch.float32),
                          dequantize(layer.qweight, qtype, (n, k), torch.float32))
                rows.append({"tokens": m, "shape": f"{n}x{k}", "type": qname, "bf16_ms": base * 1e3,
                             "eager_x": eager / base, "fast_x": fast / base, "decode_err": err})
    return rows


def print_attention(rows: list[dict]) -> None:
    print(f"{'attention kernel':<18}{'ms':>8}{'TFLOP/s':>9}{'rel err':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['kernel']:<18}  {r['error']}")
        else:
            print(f"{r['kernel']:<18}{r['ms']:8.2f}{r['tflops']:9.0f}{r['rel_err']:10.1e}")


def print_gguf(rows: list[dict]) -> None:
    print(f"{'GGUF linear':<24}{'bf16 ms':>9}{'eager x':>9}{'fast x':>8}{'decode err':>12}")
    for r in rows:
        label = f"{r['type']} {r['shape']} M={r['tokens']}"
        print(f"{label:<24}{r['bf16_ms']:9.3f}{r['eager_x']:9.2f}{r['fast_x']:8.2f}{r['decode_err']:12.1e}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=8432)
    p.add_argument("--dim", type=int, default=3072)
    p.add_argument("--heads", type=int, default=24)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print_attention(attention_table(args.tokens, args.heads, device, dtype))
    print_gguf(gguf_table(args.tokens, [(4 * args.dim, args.dim), (args.dim, 4 * args.dim)], device, dtype))


if __name__ == "__main__":
    main()
