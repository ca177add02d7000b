"""Low-VRAM switches through the trainer: same step loss (exact for block swap / offload, within fp8's rounding for
the fp8 base), smaller frozen storage with fp8."""

from __future__ import annotations

import pytest

from firered_core.memory import weight_bytes
from firered_core.training.config import load_config
from firered_core.training.synthetic import make_dataset
from firered_core.training.trainer import Trainer

from tolerances import trained_rtol  # noqa: E402

SMALL = dict(target_area=64 * 64, reference_area=64 * 64, vl_area=64 * 64, tracker=None, warmup_steps=0,
             checkpoint_every=0, resume=None, steps=2, lr=1e-2)


def test_low_vram_switches_keep_the_loss(tiny_model_dir, tmp_path):
    data = make_dataset(tmp_path / "data", rows=1)
    runs = {}
    for name, switches in {"plain": {}, "swap": {"low_vram.block_swap": True, "low_vram.offload_activations": True},
                           "fp8": {"low_vram.fp8_base": True, "low_vram.checkpointing": True}}.items():
        cfg = load_config(None, **SMALL, model=str(tiny_model_dir), data=str(data),
                          output_dir=str(tmp_path / name), **{"lora.rank": 4, **switches})
        trainer = Trainer(cfg)
        runs[name] = ([trainer.train_step() for _ in range(2)], weight_bytes(trainer.module.transformer_blocks))
    plain, swap, fp8 = runs["plain"], runs["swap"], runs["fp8"]
    assert swap[0] == pytest.approx(plain[0], rel=trained_rtol(2), abs=0)
    assert fp8[0] == pytest.approx(plain[0], rel=0.03)  # e4m3 weights (2^-4 relative), bf16 matmuls
    assert fp8[0] != plain[0]  # the switch did change the arithmetic
    assert fp8[1] < 0.5 * plain[1]  # frozen block weights: 1 byte (+ a scale per row) instead of 4


def test_fp8_base_needs_a_lora(tiny_model_dir, tmp_path):
    cfg = load_config(None, **SMALL, model=str(tiny_model_dir), data=str(make_dataset(tmp_path / "d", rows=1)),
                      output_dir=str(tmp_path / "run"), method="full", **{"low_vram.fp8_base": True})
    with pytest.raises(ValueError, match="fp8_base"):
        Trainer(cfg)
