"""Post-training objectives on several processes (torchrun + gloo, one row each) against 1 process accumulating both.

Diffusion-DPO under DDP and under FSDP (``fsdp: true``): the reference pass runs through the LoRA-disabled base of
the wrapped transformer (under FSDP only the wrapper gathers the sharded weights); DDP / FSDP must reduce the LoRA
gradients of the trained pass only, and the logged margin/accuracy (stats.json) are the mean over processes.
The processes sum the rows' gradients in another order than one process does (FSDP reduce-scatters), so every
comparison with the 1-process run allows the bound of tests/tolerances.py for that many steps (derived from fp32's
epsilon and the depth of one training step, never measured); margins, a difference of near-equal errors times
beta / 2, get that amplification stated. The identity loss (a VAE decode of face crops outside the transformer)
under FSDP: losses and identity distances within the same bound.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from firered_core.training.config import load_config
from firered_core.training.synthetic import make_dataset
from firered_core.training.trainer import train

from test_posttrain_units import TinyFaceEmbedder  # noqa: E402
from test_training_run import SMALL, relative_error, torch_threads, torchrun_train  # noqa: E402
from tolerances import dpo_margin_atol, trained_rtol  # noqa: E402

DPO = {"lora": {"rank": 4}, "preference": {"enabled": True, "beta": 500.0, "omega": 1.5, "sft_weight": 0.1},
       "variants": {"text_drop": 0.0, "inverse_rate": 0.0}}
WRAPPER = {False: "(DistributedType.MULTI_CPU): DistributedDataParallel", True: "(DistributedType.FSDP): "
           "FullyShardedDataParallel"}


@pytest.fixture(scope="module")
def dpo_one(tiny_model_dir, tmp_path_factory):
    """The 1-process DPO run (both pairs in one batch) and the settings the 2-process runs share with it."""
    tmp = tmp_path_factory.mktemp("dpo")
    data = make_dataset(tmp / "pairs", rows=2, rejected=True)
    kw = dict(**SMALL, model=str(tiny_model_dir), data=str(data), steps=3, lr=1e-2, checkpoint_every=0, **DPO)
    with torch_threads(1):
        one = train(load_config(None, output_dir=str(tmp / "one"), batch_size=2, **kw))
    return one, json.loads((tmp / "one" / "stats.json").read_text()), kw


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_process_dpo_equals_one_process(dpo_one, tmp_path, fsdp):
    one, stats_one, kw = dpo_one
    proc = torchrun_train(tmp_path, "two", {**kw, "output_dir": str(tmp_path / "two"), "batch_size": 1, "fsdp": fsdp})
    for rank in (0, 1):
        assert f"process {rank} of 2 {WRAPPER[fsdp]}" in proc.stderr, proc.stderr[-3000:]

    # The processes sum the gradients in another order (FSDP: a reduce-scatter): the bound of that many steps.
    beta = DPO["preference"]["beta"]
    two_losses = json.loads((tmp_path / "two" / "losses.json").read_text())
    for s in (1, 2, 3):
        assert float(two_losses[str(s)]) == pytest.approx(one.losses[s], rel=trained_rtol(s)), s
    stats_two = json.loads((tmp_path / "two" / "stats.json").read_text())
    assert set(stats_one) == set(stats_two) == {"1", "2", "3"}
    for step in ("2", "3"):  # step 1 starts at the reference: margin exactly 0 on both sides
        tol = dpo_margin_atol(int(step), beta)
        assert stats_two[step]["dpo_margin"] == pytest.approx(stats_one[step]["dpo_margin"], abs=tol)
        if abs(stats_one[step]["dpo_margin"]) > tol:  # a sign the rounding cannot flip
            assert stats_two[step]["dpo_accuracy"] == stats_one[step]["dpo_accuracy"]
    assert stats_one["1"]["dpo_margin"] == 0.0 and stats_one["3"]["dpo_margin"] != 0.0  # the LoRA moved
    assert stats_two["1"]["dpo_margin"] == 0.0  # the reference is the LoRA-disabled base on every rank

    a = load_file(str(one.exports["comfy"]))
    b = load_file(str(tmp_path / "two" / "export" / "firered_lora_comfy.safetensors"))
    assert set(a) == set(b) and len(a) > 20
    assert any("lora_up" in k and a[k].abs().max() > 0 for k in a)  # up factors start at 0: training moved them
    if not fsdp:  # DDP adds the two rows' gradients as one process does (a + b, then / 2: both exact orders)
        errors = sorted(((relative_error(b[k], a[k]), k) for k in a), reverse=True)
        assert errors[0][0] <= trained_rtol(3), errors[:5]
    # (under FSDP Adam's normalised step turns the rounding of near-zero gradients into whole steps of lr: the
    # weights have no bound below their own movement, and the losses above carry their effect)
    assert all(torch.isfinite(t).all() for t in b.values())


def test_fsdp_full_fine_tune_dpo_shards_its_reference(dpo_one, tmp_path):
    """Full fine-tuning's reference is a frozen copy of the transformer: under FSDP it is sharded as the trained model
    is (each rank holds half of it). Losses and margins equal 1 process's within the bound of tests/tolerances.py."""
    _, _, kw = dpo_one
    kw = {**kw, "steps": 2, "lr": 1e-3, "method": "full", "trainable": ["transformer_blocks.1.*", "proj_out.*"]}
    with torch_threads(1):
        one = train(load_config(None, output_dir=str(tmp_path / "one"), batch_size=2, **kw))
    proc = torchrun_train(tmp_path, "two", {**kw, "output_dir": str(tmp_path / "two"), "batch_size": 1, "fsdp": True})
    assert proc.stderr.count("DPO reference: a frozen copy, FullyShardedDataParallel") == 2, proc.stderr[-3000:]
    two_losses = json.loads((tmp_path / "two" / "losses.json").read_text())
    for s in (1, 2):
        assert float(two_losses[str(s)]) == pytest.approx(one.losses[s], rel=trained_rtol(s)), s
    stats_one = json.loads((tmp_path / "one" / "stats.json").read_text())
    stats_two = json.loads((tmp_path / "two" / "stats.json").read_text())
    assert stats_one["2"]["dpo_margin"] != 0.0  # the trained model left its reference
    assert stats_two["2"]["dpo_margin"] == pytest.approx(stats_one["2"]["dpo_margin"],
                                                         abs=dpo_margin_atol(2, kw["preference"]["beta"]))


def test_fsdp_identity_equals_one_process(tiny_model_dir, tmp_path):
    data = make_dataset(tmp_path / "faces", rows=2, faces=True)
    torch.manual_seed(0)
    torch.jit.script(TinyFaceEmbedder()).save(str(tmp_path / "face.pt"))
    kw = dict(**SMALL, model=str(tiny_model_dir), data=str(data), steps=2, lr=5e-2, checkpoint_every=0,
              lora={"rank": 4}, variants={"text_drop": 0.0}, timesteps={"shift": None},
              identity={"enabled": True, "eta": 1000.0, "embedder": str(tmp_path / "face.pt"), "input_size": 16})
    with torch_threads(1):
        one = train(load_config(None, output_dir=str(tmp_path / "one"), batch_size=2, **kw))
    proc = torchrun_train(tmp_path, "two", {**kw, "output_dir": str(tmp_path / "two"), "batch_size": 1, "fsdp": True})
    assert f"process 1 of 2 {WRAPPER[True]}" in proc.stderr, proc.stderr[-3000:]
    two_losses = json.loads((tmp_path / "two" / "losses.json").read_text())
    for s in (1, 2):
        assert float(two_losses[str(s)]) == pytest.approx(one.losses[s], rel=trained_rtol(s)), s
    stats_one = json.loads((tmp_path / "one" / "stats.json").read_text())
    stats_two = json.loads((tmp_path / "two" / "stats.json").read_text())
    distances = [stats_one[s].get("identity_distance") for s in ("1", "2")]
    assert any(d is not None for d in distances), stats_one  # the identity term was on in some step
    for s, want in zip(("1", "2"), distances):
        got = stats_two[s].get("identity_distance")
        assert (got is None) == (want is None)
        assert want is None or got == pytest.approx(want, rel=trained_rtol(int(s)))
