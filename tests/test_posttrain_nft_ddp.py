"""DiffusionNFT in the trainer's other modes: DDP (2 processes, torchrun + gloo, one prompt each, give the losses of
1 process with both) and extracted embeddings (the same losses as online encoding)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from firered_core.training.config import load_config
from firered_core.training.synthetic import make_dataset
from firered_core.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
VALUES = dict(target_area=64 * 64, reference_area=64 * 64, vl_area=64 * 64, tracker=None, warmup_steps=0,
              resume=None, checkpoint_every=0, steps=2, lr=5e-2)
NFT = {"lora": {"rank": 4}, "variants": {"text_drop": 0.0, "cn_rate": 0.0},
       "nft": {"enabled": True, "rollout_steps": 1, "group_size": 4, "old_decay": 0.5,
               "reward": {"callable": "test_posttrain_nft_train:brightness"}}}


def test_two_process_nft_matches_one_process(tiny_model_dir, tmp_path):
    from test_training_run import _free_port  # noqa: E402

    data = make_dataset(tmp_path / "rows", rows=2)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = train(load_config(None, **VALUES, model=str(tiny_model_dir), data=str(data), batch_size=2,
                                output_dir=str(tmp_path / "one"), **{
                                    "lora.rank": 4, "variants.text_drop": 0.0, "variants.cn_rate": 0.0,
                                    "nft.enabled": True, "nft.rollout_steps": 1, "nft.group_size": 4,
                                    "nft.old_decay": 0.5, "nft.reward.callable": NFT["nft"]["reward"]["callable"]}))
    finally:
        torch.set_num_threads(before)
    two = {**VALUES, **NFT, "model": str(tiny_model_dir), "data": str(data), "batch_size": 1,
           "output_dir": str(tmp_path / "two")}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(ROOT / "training" / "train.py"), str(tmp_path / "two.yaml")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 1 of 2 (DistributedType.MULTI_CPU): DistributedDataParallel" in proc.stderr, proc.stderr[-3000:]
    losses = {int(k): float(v) for k, v in json.loads((tmp_path / "two" / "losses.json").read_text()).items()}
    assert losses == pytest.approx(one.losses, rel=1e-5)


def test_nft_from_extracted_embeddings_equals_online(tiny_model_dir, tmp_path):
    """The prompt groups share a row's extracted instruction embedding and reference latents: same losses."""
    from firered_core.training.extract import ExtractConfig, extract

    data = make_dataset(tmp_path / "rows", rows=1)
    extract(ExtractConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "emb"), variants=["en"],
                          vl_area=64 * 64, target_area=64 * 64, reference_area=64 * 64, cache_latents=True))
    kw = dict(**VALUES, model=str(tiny_model_dir), data=str(data), **{
        "lora.rank": 4, "variants.text_drop": 0.0, "variants.cn_rate": 0.0, "variants.inverse_rate": 0.0,
        "alignment.drop_rate": 0.0, "alignment.permute_rate": 0.0, "nft.enabled": True, "nft.rollout_steps": 1,
        "nft.group_size": 4, "nft.reward.callable": NFT["nft"]["reward"]["callable"]})
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        online = train(load_config(None, output_dir=str(tmp_path / "online"), **kw))
        cached = train(load_config(None, output_dir=str(tmp_path / "cached"), embeddings=str(tmp_path / "emb"), **kw))
    finally:
        torch.set_num_threads(before)
    assert cached.losses == pytest.approx(online.losses, rel=1e-6)
