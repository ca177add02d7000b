"""Extract instruction embeddings (and optionally VAE latents) for training, sharded across processes.

GPUs:
    accelerate launch --num_processes 8 training/extract_embeddings.py --model MODEL --data DATA --out EMB
        --prompt-mode pipeline --variants en cn empty inverse inverse_cn [--cache-latents]
Several CPU processes (`accelerate launch --cpu` starts only one):
    torchrun --nproc_per_node 2 training/extract_embeddings.py --model MODEL --data DATA --out EMB

Re-running after a crash skips every finished row. Train on the result with `embeddings: EMB` and the same
prompt mode.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from firered_core.conditioning import PROMPT_MODES  # noqa: E402
from firered_core.errors import FireRedError, one_line  # noqa: E402
from firered_core.geometry import VAE_AREA, VL_AREA  # noqa: E402
from firered_core.training.alignment import VARIANTS  # noqa: E402
from firered_core.training.extract import ExtractConfig, extract  # noqa: E402
from firered_core.limits import check  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Exit 0, or 2 with one line on stderr for bad options, bad data or an unreadable file."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder or file, as the trainer's `model`")
    p.add_argument("--data", required=True, nargs="+", help="data root(s): one folder per task, *.jsonl inside")
    p.add_argument("--out", required=True, help="output folder (rows/, manifest.json)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                   help="instruction variants to embed (default: all)")
    p.add_argument("--prompt-mode", default=PROMPT_MODES[0], choices=PROMPT_MODES,
                   help="'pipeline' (Picture N: labels, as inference) or 'chat' (FireRed's trainer template)")
    p.add_argument("--vl-area", type=float, default=VL_AREA, help="pixel area of references for the text encoder")
    p.add_argument("--cache-latents", action="store_true", help="also cache VAE latents of targets and references")
    p.add_argument("--target-area", type=float, default=VAE_AREA, help="training pixel area of the target")
    p.add_argument("--reference-area", type=float, default=VAE_AREA, help="training pixel area of references")
    p.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"), help="encoder dtype")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch
    from accelerate import PartialState

    try:
        check({"vl_area": a.vl_area, "target_area": a.target_area, "reference_area": a.reference_area},
              spell=lambda name: "--" + name.replace("_", "-"),
              limits={"target_area": "vae_area", "reference_area": "vae_area"})
        state = PartialState(cpu=not torch.cuda.is_available())
        cfg = ExtractConfig(model=a.model, data=a.data, output_dir=a.out, variants=a.variants,
                            prompt_mode=a.prompt_mode, vl_area=a.vl_area, cache_latents=a.cache_latents,
                            target_area=a.target_area, reference_area=a.reference_area, dtype=a.dtype)
        summary = extract(cfg, state.process_index, state.num_processes, str(state.device),
                          wait=state.wait_for_everyone)
    except (FireRedError, OSError) as exc:
        print(f"extract_embeddings.py: error: {one_line(exc)}", file=sys.stderr)
        return 2
    logging.info("rank %d: encoded %d rows, skipped %d finished, %d bad rows", state.process_index,
                 summary["encoded"], summary["skipped"], summary["bad_rows"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
