"""The post-training pieces behind the shipped recipes, on fixed tensors: NFT's trust region and rounds, the
identity term's normalisation, and the warning for runs outside the proven range."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from firered_core.training.buckets import BucketSampler
from firered_core.training.config import load_config
from firered_core.training.data import Sample
from firered_core.training.identity import IdentityConfig, identity_loss
from firered_core.training.nft import nft_loss
from firered_core.training.proven import outside_proven

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"


def test_nft_trust_region_adds_the_squared_velocity_gap_by_hand():
    # one rollout, 2 tokens x 1 channel; beta 1: v+ = v, v- = 2 v_old - v
    v = torch.tensor([[[1.0], [3.0]]], requires_grad=True)
    v_old, noise, x0 = torch.tensor([[[0.0], [1.0]]]), torch.tensor([[[1.0], [1.0]]]), torch.zeros(1, 2, 1)
    r = torch.tensor([0.75])
    base, _ = nft_loss(v, v_old, noise, x0, r, beta=1.0)
    with_kl, _ = nft_loss(v, v_old, noise, x0, r, beta=1.0, kl_weight=0.5)
    # by hand: target 1; e+ = mean((1-1)^2, (3-1)^2) = 2; v- = (-1, -1): e- = mean(4, 4) = 4; 0.75*2 + 0.25*4 = 2.5
    assert base.item() == pytest.approx(2.5, abs=1e-6)
    # kl: mean((1-0)^2, (3-1)^2) = 2.5, times 0.5
    assert with_kl.item() == pytest.approx(2.5 + 1.25, abs=1e-6)
    (g,) = torch.autograd.grad(with_kl - base, v)
    assert torch.allclose(g, 0.5 * 2 * (v - v_old).detach() / 2)  # d/dv of 0.5 * mean((v - v_old)^2)


def _sample(i: int) -> Sample:
    return Sample(task="t", sources=(Path(f"s{i}.png"),), target=Path(f"t{i}.png"), instruction="x",
                  instruction_cn="x", inverse_instruction=None, inverse_instruction_cn=None,
                  source_sizes=((64, 64),), target_size=(64, 64), file="d.jsonl", line=i + 1)


def test_sampler_repeats_a_round_and_resumes_inside_it():
    samples = [_sample(i) for i in range(5)]
    sampler = BucketSampler(samples, batch_size=2, repeat=3, seed=1)
    batches = [sampler.next() for _ in range(7)]
    assert batches[0].indices == batches[1].indices == batches[2].indices
    assert batches[3].indices == batches[4].indices == batches[5].indices != batches[0].indices
    assert [b.step for b in batches] == list(range(7))
    # stopped inside round 1 (after step 4), resumed: the same rows for step 5, then a new round
    ref = BucketSampler(samples, batch_size=2, repeat=3, seed=1)
    for _ in range(5):
        ref.next()
    state = ref.state_dict()
    resumed = BucketSampler(samples, batch_size=2, repeat=3, seed=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint stores it
    assert [resumed.next().indices for _ in range(2)] == [b.indices for b in batches[5:7]]
    plain = BucketSampler(samples, batch_size=2, seed=1)
    assert plain.next().indices == batches[0].indices and plain.next().indices != batches[0].indices


def test_normalised_identity_term_has_value_lambda_and_the_relative_gradient(tiny_model_dir):
    from firered_core.model import load_model

    # a model of its own: the session's shared one may hold weights made under inference_mode by earlier tests
    vae = load_model(tiny_model_dir).vae.float().requires_grad_(False)
    torch.manual_seed(0)
    embedder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 8))
    x0 = torch.randn(1, 16, 64)  # 64x64 image: 4x4 packed tokens of 64 channels
    xt, sigma = torch.randn(1, 16, 64), torch.tensor([0.5])
    v = torch.randn(1, 16, 64, requires_grad=True)
    args = (xt, sigma, v, x0, [[0, 0, 32, 32]], (64, 64), (64, 64), vae, embedder)
    plain, stats = identity_loss(*args, IdentityConfig(eta=2.0, input_size=16))
    norm, _ = identity_loss(*args, IdentityConfig(eta=2.0, input_size=16, normalise=True))
    d = stats["identity_distance"]
    assert plain.item() == pytest.approx(2.0 * 0.25 * d, rel=1e-5)
    assert norm.item() == pytest.approx(2.0 * 0.25, rel=1e-6)  # the value is lambda(sigma) exactly
    (gp,) = torch.autograd.grad(plain, v)
    (gn,) = torch.autograd.grad(norm, v)
    assert torch.allclose(gn, gp / d, rtol=1e-4, atol=1e-9)  # the gradient is the plain one over d


@pytest.mark.parametrize("name", ["dpo_lora.yaml", "nft_lora.yaml", "identity_sft.yaml"])
def test_shipped_recipes_are_inside_the_proven_range_and_a_change_warns(name, caplog):
    cfg = load_config(CONFIGS / name)
    assert outside_proven(cfg) == []
    section = {"dpo_lora.yaml": "preference.omega", "nft_lora.yaml": "nft.kl_weight",
               "identity_sft.yaml": "identity.eta"}[name]
    short = load_config(CONFIGS / name, [f"steps={cfg.steps // 10}", f"{section}=3.0"])
    with caplog.at_level(logging.WARNING):
        from firered_core.training.proven import warn_outside_proven

        lines = warn_outside_proven(short)
    assert len(lines) == 2 and "lr x steps" in lines[0] and f"{section} = 3.0" in lines[1], lines
    assert "outside the range" in caplog.text
    # the benchmark's scaling (lr x steps kept) stays inside
    assert outside_proven(load_config(CONFIGS / name, [f"steps={cfg.steps // 10}", f"lr={cfg.lr * 10}"])) == []
