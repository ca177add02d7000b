"""Train FireRed-Image-Edit (LoRA or full fine-tune).

GPUs (DDP, or FSDP with fsdp=true):
    accelerate launch training/train.py training/configs/lora.yaml lr=5e-5 lora.rank=64
Several CPU processes (gloo; `accelerate launch --cpu` starts only one):
    torchrun --nproc_per_node 2 training/train.py CONFIG key=value ...
One process:
    python training/train.py CONFIG key=value ...

FIRERED_LOG=DEBUG|INFO|WARNING sets the log level (INFO by default).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from firered_core.errors import FireRedError, one_line  # noqa: E402
from firered_core.training.config import load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Exit 0, or 2 with one line on stderr for a bad config, bad data or an unreadable file."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML or TOML config file")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides (values parsed as YAML)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("FIRERED_LOG", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from firered_core.training.trainer import train

        result = train(load_config(args.config, args.overrides))
    except (FireRedError, OSError) as exc:
        print(f"train.py: error: {one_line(exc)}", file=sys.stderr)
        return 2
    logging.info("done: %d steps, last loss %.4f, %.3f samples/s, exports %s", len(result.losses),
                 list(result.losses.values())[-1] if result.losses else float("nan"), result.samples_per_s,
                 {k: str(v) for k, v in result.exports.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
