"""Diffusion-DPO under DDP: 2 processes (torchrun + gloo, one pair each) equal 1 process accumulating both pairs.

The reference pass runs through the LoRA-disabled base of the DDP-wrapped transformer; DDP must all-reduce the LoRA
gradients of the trained pass only, and the logged margin/accuracy (stats.json) are the mean over processes.
Measured on this CPU: losses, margins and final LoRA weights bit-identical; asserted within 1e-6 relative (1e-5 for
the margin, a difference of two near-equal errors).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from firered_core.training.config import load_config
from firered_core.training.synthetic import make_dataset
from firered_core.training.trainer import train

from test_training_run import SMALL, relative_error, torch_threads, torchrun_train  # noqa: E402

DPO = {"lora": {"rank": 4}, "preference": {"enabled": True, "beta": 500.0, "omega": 1.5, "sft_weight": 0.1},
       "variants": {"text_drop": 0.0, "inverse_rate": 0.0}}


def test_two_process_dpo_equals_one_process(tiny_model_dir, tmp_path):
    data = make_dataset(tmp_path / "pairs", rows=2, rejected=True)
    kw = dict(**SMALL, model=str(tiny_model_dir), data=str(data), steps=3, lr=1e-2, checkpoint_every=0, **DPO)
    with torch_threads(1):
        one = train(load_config(None, output_dir=str(tmp_path / "one"), batch_size=2, **kw))
    proc = torchrun_train(tmp_path, "two", {**kw, "output_dir": str(tmp_path / "two"), "batch_size": 1})
    assert "process 1 of 2 (DistributedType.MULTI_CPU): DistributedDataParallel" in proc.stderr, proc.stderr[-3000:]

    two_losses = json.loads((tmp_path / "two" / "losses.json").read_text())
    assert [float(two_losses[str(s)]) for s in (1, 2, 3)] == pytest.approx([one.losses[s] for s in (1, 2, 3)],
                                                                           rel=1e-6)
    stats_one = json.loads((tmp_path / "one" / "stats.json").read_text())
    stats_two = json.loads((tmp_path / "two" / "stats.json").read_text())
    assert set(stats_one) == set(stats_two) == {"1", "2", "3"}
    for step in ("2", "3"):  # step 1 starts at the reference: margin exactly 0 on both sides
        assert stats_two[step]["dpo_margin"] == pytest.approx(stats_one[step]["dpo_margin"], rel=1e-5, abs=1e-7)
        assert stats_two[step]["dpo_accuracy"] == stats_one[step]["dpo_accuracy"]
    assert stats_one["1"]["dpo_margin"] == 0.0 and stats_one["3"]["dpo_margin"] != 0.0  # the LoRA moved

    a = load_file(str(one.exports["comfy"]))
    b = load_file(str(tmp_path / "two" / "export" / "firered_lora_comfy.safetensors"))
    assert set(a) == set(b) and len(a) > 20
    assert any("lora_up" in k and a[k].abs().max() > 0 for k in a)  # up factors start at 0: training moved them
    errors = sorted(((relative_error(b[k], a[k]), k) for k in a), reverse=True)
    assert errors[0][0] <= 1e-6, errors[:5]  # measured: 0 (one thread per process, fp32)
    assert all(torch.isfinite(t).all() for t in b.values())
