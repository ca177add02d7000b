"""Preference and identity training resume exactly: losses after a kill and resume equal the uninterrupted run's."""

from __future__ import annotations

import json

from firered_core.training.config import load_config
from firered_core.training.synthetic import make_dataset
from firered_core.training.trainer import train

from kills import killed_after  # noqa: E402

SMALL = dict(target_area=64 * 64, reference_area=64 * 64, vl_area=64 * 64, tracker=None, warmup_steps=0)


def test_dpo_resume_is_exact(tiny_model_dir, tmp_path):
    data = make_dataset(tmp_path / "pairs", rows=2, rejected=True)
    kw = dict(**SMALL, model=str(tiny_model_dir), data=str(data), steps=3, lr=1e-2, checkpoint_every=2,
              **{"lora.rank": 4, "preference.enabled": True, "preference.beta": 500.0, "preference.omega": 1.5,
                 "preference.sft_weight": 0.1, "variants.text_drop": 0.0})
    full = train(load_config(None, output_dir=str(tmp_path / "full"), **kw))
    with killed_after(2):
        train(load_config(None, output_dir=str(tmp_path / "cut"), **kw))
    resumed = train(load_config(None, output_dir=str(tmp_path / "cut"), **kw))
    assert list(resumed.losses) == [1, 2, 3]
    assert resumed.losses == full.losses  # exact: same draws, same reference (the LoRA-disabled base)
    # the per-step statistics of the steps before the kill come back from the checkpoint
    stats = [json.loads((tmp_path / run / "stats.json").read_text()) for run in ("full", "cut")]
    assert stats[0] == stats[1] and list(stats[0]) == ["1", "2", "3"]


def test_identity_resume_is_exact(tiny_model_dir, tmp_path):
    import torch
    from test_posttrain_units import TinyFaceEmbedder  # noqa: E402

    data = make_dataset(tmp_path / "faces", rows=2, faces=True)
    torch.manual_seed(0)
    torch.jit.script(TinyFaceEmbedder()).save(str(tmp_path / "face.pt"))
    kw = dict(**SMALL, model=str(tiny_model_dir), data=str(data), steps=3, lr=1e-2, checkpoint_every=2,
              **{"lora.rank": 4, "variants.text_drop": 0.0, "timesteps.shift": None, "identity.enabled": True,
                 "identity.eta": 10.0, "identity.embedder": str(tmp_path / "face.pt"), "identity.input_size": 16})
    full = train(load_config(None, output_dir=str(tmp_path / "full"), **kw))
    with killed_after(2):
        train(load_config(None, output_dir=str(tmp_path / "cut"), **kw))
    resumed = train(load_config(None, output_dir=str(tmp_path / "cut"), **kw))
    assert resumed.losses == full.losses
