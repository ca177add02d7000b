"""Training throughput on this machine: samples/s and peak memory for the tiny and medium presets.

    python -m benchmarks.training --presets tiny medium --steps 4 --size 256
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import peak_rss_mb
from firered_core.demo_models import build_model
from firered_core.training.config import load_config
from firered_core.training.synthetic import make_dataset
from firered_core.training.trainer import Trainer


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def bench(preset: str, steps: int, size: int, method: str, root: Path, model: str | None = None) -> dict:
    model = model or str(build_model(root / f"model-{preset}", preset))
    data = make_dataset(root / f"data-{size}", rows=4, sizes=((size, size),))
    cfg = load_config(None, model=model, data=str(data), output_dir=str(root / f"run-{preset}-{method}"),
                      steps=steps + 1, method=method, target_area=size * size, reference_area=size * size,
                      vl_area=min(size * size, 384 * 384), tracker=None, checkpoint_every=0, resume=None,
                      **{"variants.text_drop": 0.0})
    trainer = Trainer(cfg)
    trainer.train_step()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"preset": preset, "method": method, "size": size, "steps": steps,
            "samples_per_s": steps * cfg.batch_size / elapsed, "s_per_step": elapsed / steps,
            "peak_mb": peak_memory_mb()}


def table(rows: list[dict]) -> str:
    head = f"{'preset':8} {'method':6} {'size':>5} {'samples/s':>10} {'s/step':>8} {'peak MB':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['preset']:8} {r['method']:6} {r['size']:>5} {r['samples_per_s']:>10.3f} "
                     f"{r['s_per_step']:>8.2f} {r['peak_mb']:>9.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "medium"])
    p.add_argument("--methods", nargs="+", default=["lora", "full"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--size", type=int, default=256)
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in a.presets:
            for method in a.methods:
                rows.append(bench(preset, a.steps, a.size, method, Path(tmp)))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
