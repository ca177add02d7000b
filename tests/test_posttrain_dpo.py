"""Diffusion-DPO through the trainer on the tiny model: the reference is the LoRA-disabled base, the margin rises."""

from __future__ import annotations

import pytest

from firered_core.training.config import load_config
from firered_core.training.synthetic import make_dataset
from firered_core.training.trainer import Trainer

SMALL = dict(target_area=64 * 64, reference_area=64 * 64, vl_area=64 * 64, tracker=None, warmup_steps=0,
             checkpoint_every=0, resume=None)
DPO = {"lora.rank": 4, "preference.enabled": True, "preference.beta": 500.0, "variants.text_drop": 0.0}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("pairs"), rows=2, rejected=True)


def test_dpo_raises_the_preferred_margin_from_zero(tiny_model_dir, pairs, tmp_path):
    cfg = load_config(None, **SMALL, model=str(tiny_model_dir), data=str(pairs), output_dir=str(tmp_path / "run"),
                      steps=4, lr=2e-2, **DPO)
    trainer = Trainer(cfg)
    loss0, before = trainer.evaluate_objective(rows=2, draws=1)
    # the LoRA starts at zero, so the model is its reference: margin 0 and loss log 2 exactly
    assert before["dpo_margin"] == 0.0 and loss0 == pytest.approx(0.6931472, abs=1e-6)
    result = trainer.run()
    loss1, after = trainer.evaluate_objective(rows=2, draws=1)
    assert after["dpo_margin"] > 0.05 and loss1 < loss0 - 0.02, (before, after, loss1)
    assert set(trainer.stats) == {"dpo_margin", "dpo_accuracy"} and len(result.losses) == 4
    assert "comfy" in result.exports


def test_dpo_refuses_rows_without_a_rejected_image_and_inverse_edits(tiny_model_dir, tmp_path):
    from firered_core.training.data import DataError

    plain = make_dataset(tmp_path / "plain", rows=1)
    cfg = load_config(None, **SMALL, model=str(tiny_model_dir), data=str(plain), output_dir=str(tmp_path / "run"),
                      steps=1, **DPO)
    with pytest.raises(DataError, match="data.jsonl:1: preference training needs a rejected_image"):
        Trainer(cfg).train_step()
    with pytest.raises(ValueError, match="inverse_rate"):
        Trainer(load_config(None, **SMALL, model=str(tiny_model_dir), data=str(plain),
                            output_dir=str(tmp_path / "run"), steps=1, **{**DPO, "variants.inverse_rate": 0.5}))
