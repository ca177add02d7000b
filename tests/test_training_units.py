"""Data, buckets, noise levels, losses, alignment, EMA and row files: no model needed."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch

from firered_core.embed_cache import canonical_safetensors
from firered_core.sampling import SCHEDULER_CONFIG
from firered_core.training import alignment, timesteps
from firered_core.training.buckets import BucketSampler, bucket_key, ratio_bin
from firered_core.training.data import DataError, load_dataset, parse_weights
from firered_core.training.ema import EMA
from firered_core.sampling import noised_start
from firered_core.training.losses import flow_matching_loss, loss_weight
from firered_core.training.synthetic import make_dataset


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_dataset(root, rows=12, sizes=((64, 64), (96, 64), (64, 128)), tasks=("a", "b"), sources=(1, 2, 0))
    return root


def test_rows_and_task_folders(data_root):
    ds = load_dataset(data_root)
    assert len(ds) == 24 and ds.tasks == ["a", "b"] and not ds.bad
    counts = {len(s.sources) for s in ds.samples}
    assert counts == {0, 1, 2}
    one = next(s for s in ds.samples if len(s.sources) == 1)
    assert one.has_inverse and one.source_sizes[0] == one.target_size


def test_bad_rows_are_named_skipped_and_counted(tmp_path, data_root):
    task = tmp_path / "t"
    task.mkdir()
    good = (data_root / "a" / "data.jsonl").read_text().splitlines()[0]
    good = json.loads(good)
    good = {**good, "source_image": str(data_root / "a" / good["source_image"]),
            "target_image": str(data_root / "a" / good["target_image"])}
    lines = [json.dumps(good), "{not json", json.dumps({"instruction": "x"}),
             json.dumps({**good, "source_image": "missing.png"}), "",
             json.dumps({**good, "edit_image": good["target_image"], "target_image": None})]
    (task / "rows.jsonl").write_text("\n".join(lines) + "\n")
    ds = load_dataset(tmp_path)
    assert len(ds) == 2
    where = [(b.file.endswith("rows.jsonl"), b.line) for b in ds.bad]
    assert where == [(True, 2), (True, 3), (True, 4)]
    assert "missing.png" in str(ds.bad[2]) and "rows.jsonl:4:" in str(ds.bad[2])
    assert ds.samples[1].line == 6  # edit_image accepted


def test_all_bad_rows_stop_with_the_count(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "x.jsonl").write_text("{}\n[1]\nnope\n")
    with pytest.raises(DataError, match="3 bad row"):
        load_dataset(tmp_path)


def test_weights_parse():
    assert parse_weights("a=0.5,b=1.2") == {"a": 0.5, "b": 1.2}
    assert parse_weights("0=1,1=1,2=1,3=0", int) == {0: 1.0, 1: 1.0, 2: 1.0, 3: 0.0}
    with pytest.raises(DataError):
        parse_weights("a:1")


def test_bucket_keys(data_root):
    assert ratio_bin(1000, 100) == 4.0 and ratio_bin(100, 1000) == 0.25 and ratio_bin(96, 64) == 1.5
    ds = load_dataset(data_root)
    keys = {bucket_key(s) for s in ds.samples}
    assert ("a", 1, (1.0,), 1.0) in keys and ("b", 2, (1.5, 1.5), 1.5) in keys


def test_sampler_weights_counts_and_rank_slices(data_root):
    ds = load_dataset(data_root)
    s = BucketSampler(ds.samples, batch_size=2, world_size=2, task_weights={"a": 3.0, "b": 1.0},
                      count_weights={0: 0, 1: 1, 2: 1}, seed=1)
    batches = [s.next() for _ in range(400)]
    for b in batches:
        rows = [ds.samples[i] for i in b.indices]
        assert len(rows) == 4 and len({bucket_key(r) for r in rows}) == 1
        assert len(rows[0].sources) in (1, 2)
        assert b.for_rank(0, 2) + b.for_rank(1, 2) == b.indices
    share_a = np.mean([b.key[0] == "a" for b in batches])
    assert 0.65 < share_a < 0.85  # 3:1 weights over equal-sized tasks


def test_ranks_draw_the_same_batches_whatever_their_own_randomness(data_root):
    """Each rank builds its own sampler; ranks differ only in their process-wide RNG states (seeded per rank by
    accelerate and consumed differently by each rank's work), so a sampler that drew from those would split them."""
    ds = load_dataset(data_root)
    ranks = [BucketSampler(ds.samples, 2, world_size=2, seed=5) for _ in range(2)]
    counts = set()
    for step in range(60):
        draws = []
        for rank, sampler in enumerate(ranks):
            random.seed(1000 * rank + step)
            np.random.seed(1000 * rank + step)
            torch.manual_seed(1000 * rank + step)
            draws.append(sampler.next())
        a, b = draws
        assert a == b, f"step {step}: rank 0 drew {a}, rank 1 drew {b}"
        rows = [ds.samples[i] for i in a.for_rank(0, 2) + b.for_rank(1, 2)]
        assert {len(r.sources) for r in rows} == {a.key[1]} == {len(a.key[2])}
        assert {bucket_key(r) for r in rows} == {a.key}
        counts.add(a.key[1])
    assert counts == {0, 1, 2}  # the source count itself varies from step to step


def test_sampler_state_resumes_exactly(data_root):
    ds = load_dataset(data_root)
    full = BucketSampler(ds.samples, 3, seed=2)
    ref = [full.next() for _ in range(30)]
    part = BucketSampler(ds.samples, 3, seed=2)
    [part.next() for _ in range(11)]
    state = json.loads(json.dumps(part.state_dict()))
    resumed = BucketSampler(ds.samples, 3, seed=2)
    resumed.load_state_dict(state)
    assert [resumed.next() for _ in range(19)] == ref[11:]
    with pytest.raises(ValueError, match="batch size"):
        BucketSampler(ds.samples, 2, seed=2).load_state_dict(state)


def test_sampler_covers_a_bucket_before_repeating(data_root):
    ds = load_dataset(data_root)
    s = BucketSampler(ds.samples, 1, seed=0)
    seen: dict = {}
    for _ in range(400):
        b = s.next()
        seen.setdefault(b.key, []).append(b.indices[0])
    assert set(seen) == set(s.buckets) and max(len(m) for m in s.buckets.values()) >= 2
    for key, rows in seen.items():
        members = sorted(s.buckets[key])
        epochs = len(rows) // len(members)
        assert epochs >= 2, f"bucket {key} drawn {len(rows)} times, fewer than two passes over {len(members)} rows"
        for e in range(epochs):
            assert sorted(rows[e * len(members):(e + 1) * len(members)]) == members, f"bucket {key}, pass {e}"


def test_stratified_rotating_intervals():
    n = 4
    for step in range(3):
        u = timesteps.stratified_u(step, range(n), n, seed=0)
        strata = (u * n).floor().long().tolist()
        assert sorted(strata) == list(range(n))
        assert strata[0] == step % n  # rank 0's interval rotates
    a = timesteps.stratified_u(7, [2, 3], 4, seed=0)
    b = timesteps.stratified_u(7, range(4), 4, seed=0)[2:]
    assert torch.equal(a, b)  # a rank's rows do not depend on who else draws


def test_timestep_distributions_and_curriculum():
    u = (torch.arange(2000, dtype=torch.float64) + 0.5) / 2000
    cfg = timesteps.TimestepConfig(kind="logit_normal", shift=None)
    t = timesteps.base_sigmas(u, cfg, 0)
    assert abs(float(t.median()) - 0.5) < 0.01 and float(((t > 0.27) & (t < 0.73)).float().mean()) == pytest.approx(0.68, abs=0.02)
    cur = timesteps.TimestepConfig(kind="curriculum", curriculum_start=0.8, curriculum_steps=100, shift=None)
    assert float(timesteps.base_sigmas(u, cur, 0).min()) >= 0.8
    assert 0.35 < float(timesteps.base_sigmas(u, cur, 50).min()) < 0.45
    assert float(timesteps.base_sigmas(u, cur, 100).min()) < 0.01
    assert torch.allclose(timesteps.base_sigmas(u, cur, 500), timesteps.base_sigmas(u, timesteps.TimestepConfig(), 0))


def test_dynamic_shift_is_the_inference_schedule():
    from firered_core.sampling import make_sigmas

    steps, seq = 10, 4096
    inf = make_sigmas(steps, seq, SCHEDULER_CONFIG)
    base = torch.linspace(1.0, 1 / steps, steps, dtype=torch.float64)
    mine = timesteps.shift_sigmas(base, "dynamic", seq, {**SCHEDULER_CONFIG, "shift_terminal": None})
    ref = make_sigmas(steps, seq, {**SCHEDULER_CONFIG, "shift_terminal": None})
    assert torch.allclose(mine.float(), ref[:-1].float(), atol=1e-5)
    assert inf[0] == pytest.approx(1.0)
    big = timesteps.shift_sigmas(torch.tensor([0.5], dtype=torch.float64), "dynamic", 8192, SCHEDULER_CONFIG)
    small = timesteps.shift_sigmas(torch.tensor([0.5], dtype=torch.float64), "dynamic", 256, SCHEDULER_CONFIG)
    assert float(big) > float(small) > 0.5


def test_flow_matching_loss_target_and_outlier_mask():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 8, 4, generator=g), torch.randn(2, 8, 4, generator=g)
    sigma = torch.tensor([0.3, 0.9])
    xt = noised_start(x0, noise, sigma)
    assert torch.allclose(xt[1], 0.1 * x0[1] + 0.9 * noise[1])
    exact = noise - x0
    loss, stats = flow_matching_loss(exact, noise, x0, sigma)
    assert float(loss) == 0.0 and stats["masked_fraction"] == 0.0
    pred = exact.clone()
    pred[0, 0, 0] += 1000.0
    pred[1] += 0.5
    loss, stats = flow_matching_loss(pred, noise, x0, sigma)
    assert float(loss) == pytest.approx(0.125) and stats["masked_fraction"] == pytest.approx(1 / 64)
    w = loss_weight(sigma, "sigma_sqrt")
    loss_w, _ = flow_matching_loss(pred, noise, x0, sigma, weighting="sigma_sqrt")
    assert float(loss_w) == pytest.approx(float(w[1]) * 0.25 / 2)
    assert float(loss_weight(torch.tensor([0.5]), "cosmap")) == pytest.approx(4 / np.pi)


def test_mentions_reindex_en_and_cn():
    text = "Put the hat from Picture 2 on the man in picture 1; 图2的帽子戴到图一的人头上, see image 3"
    assert alignment.mentions(text) == {1, 2, 3}
    out = alignment.reindex(text, {1: 2, 2: 1, 3: 3})
    assert out == "Put the hat from Picture 1 on the man in picture 2; 图1的帽子戴到图二的人头上, see image 3"


def test_align_permutes_and_drops_only_unnamed_images():
    cfg = alignment.AlignmentConfig(drop_rate=1.0, permute_rate=0.0)
    rng = np.random.default_rng(0)
    order, texts = alignment.align(3, ["Make Picture 3 look like Picture 1"], rng, cfg)
    assert order == [0, 2] and texts == ["Make Picture 2 look like Picture 1"]
    cfg = alignment.AlignmentConfig(drop_rate=0.0, permute_rate=1.0)
    for seed in range(10):
        order, (en, cn) = alignment.align(2, ["Picture 1 onto Picture 2", "图1放到图2上"],
                                          np.random.default_rng(seed), cfg)
        want = {0: "1", 1: "2"}
        assert en == f"Picture {want[order.index(0)]} onto Picture {want[order.index(1)]}"
        assert cn == f"图{want[order.index(0)]}放到图{want[order.index(1)]}上"
    order, _ = alignment.align(2, ["Picture 1 and Picture 2"], np.random.default_rng(0),
                               alignment.AlignmentConfig(drop_rate=1.0))
    assert order == [0, 1]  # both named: nothing may be dropped


def test_variant_rates():
    rng = np.random.default_rng(0)
    cfg = alignment.VariantConfig(text_drop=0.1, cn_rate=0.5, inverse_rate=0.2)
    got = [alignment.choose_variant(True, rng, cfg) for _ in range(4000)]
    share = {v: got.count(v) / len(got) for v in alignment.VARIANTS}
    assert share["empty"] == pytest.approx(0.1, abs=0.02)
    assert share["inverse"] + share["inverse_cn"] == pytest.approx(0.18, abs=0.03)
    assert "inverse" not in {alignment.choose_variant(False, rng, cfg) for _ in range(200)}


def test_ema_tracks_and_resumes():
    p = {"w": torch.zeros(3)}
    ema = EMA(p, decay=0.5, warmup=False)
    p["w"] += 1.0
    ema.update(p)
    assert torch.allclose(ema.shadow["w"], torch.full((3,), 0.5))
    other = EMA({"w": torch.zeros(3)}, decay=0.5, warmup=False)
    other.load_state_dict(ema.state_dict())
    p["w"] += 1.0
    ema.update(p)
    other.update(p)
    assert torch.equal(ema.shadow["w"], other.shadow["w"]) and other.updates == 2
    with pytest.raises(ValueError):
        other.load_state_dict({"tensors": {"v": torch.zeros(3)}, "updates": 0})


def test_canonical_safetensors_is_byte_stable_and_loads(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load, save

    tensors = {"b": torch.randn(3, 5), "a": torch.arange(7), "c": torch.ones(2, dtype=torch.bfloat16)}
    meta = {f"k{i}": str(i) for i in range(8)}
    files = {canonical_safetensors(save(tensors, metadata=meta)) for _ in range(10)}
    assert len(files) == 1
    data = files.pop()
    assert all(torch.equal(v, load(data)[k]) for k, v in tensors.items())
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata() == meta


def test_optimizer_state_keyed_by_name_loads_as_the_index_keyed_one():
    """Checkpoints key the optimizer state by parameter name (FSDP's full optimizer state dict only takes names); an
    older index-keyed state is renamed in order, and a plain optimizer loads the named state as it loads its own."""
    from firered_core.training.checkpoint import CheckpointError, optimizer_by_name

    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    opt = torch.optim.AdamW(params, lr=0.1)
    for p in params:
        p.grad = torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) + 1
    opt.step()
    state = opt.state_dict()
    named = optimizer_by_name(state, ["a", "b"])
    assert named["param_groups"][0]["params"] == ["a", "b"] and set(named["state"]) == {"a", "b"}
    assert named["state"]["b"]["exp_avg"] is state["state"][1]["exp_avg"]
    assert optimizer_by_name(named, ["x", "y"]) is named  # names stay
    results = []
    for saved in (state, named, None):  # None: a fresh optimizer, to see that the loaded state matters
        copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = torch.optim.AdamW(copies, lr=0.1)
        if saved is not None:  # a copy: the load keeps the saved moments, the step then updates them in place
            opt.load_state_dict(copy.deepcopy(saved))
        for p in copies:
            p.grad = torch.ones_like(p)
        opt.step()
        results.append(torch.cat([p.detach().flatten() for p in copies]))
    assert torch.equal(results[0], results[1]) and not torch.allclose(results[0], results[2])
    with pytest.raises(CheckpointError, match="optimizer holds 2 tensors, this run trains 3"):
        optimizer_by_name(state, ["a", "b", "c"])
