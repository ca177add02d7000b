"""Extract instruction embeddings (and optionally VAE latents) for training, sharded across processes.

    accelerate launch --num_processes 8 training/extract_embeddings.py --model MODEL --data DATA --out EMB \
        --prompt-mode pipeline --variants en cn empty inverse inverse_cn [--cache-latents]

Re-running after a crash skips every finished row.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from firered_core.training.extract import ALL_VARIANTS, ExtractConfig, extract  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--variants", nargs="+", default=list(ALL_VARIANTS), choices=ALL_VARIANTS)
    p.add_argument("--prompt-mode", default="pipeline", choices=("pipeline", "chat"))
    p.add_argument("--vl-area", type=float, default=384 * 384)
    p.add_argument("--cache-latents", action="store_true")
    p.add_argument("--target-area", type=float, default=1024 * 1024)
    p.add_argument("--reference-area", type=float, default=1024 * 1024)
    p.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    cfg = ExtractConfig(model=a.model, data=a.data, output_dir=a.out, variants=a.variants, prompt_mode=a.prompt_mode,
                        vl_area=a.vl_area, cache_latents=a.cache_latents, target_area=a.target_area,
                        reference_area=a.reference_area, dtype=a.dtype)
    summary = extract(cfg, state.process_index, state.num_processes, str(state.device), a.stop_after,
                      wait=state.wait_for_everyone)
    logging.info("rank %d: encoded %d rows, skipped %d finished, %d bad rows", state.process_index,
                 summary["encoded"], summary["skipped"], summary["bad_rows"])


if __name__ == "__main__":
    main()
