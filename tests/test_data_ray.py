"""The Ray Data engine (local Ray, 2 workers) gives the same decisions.jsonl as the local engine, including a
model stage (embedding descriptor) that Ray runs as an actor pool. Skipped when ray is not installed (it is in the
``data`` extra, not in ``dev``: ~400 MB with pyarrow); run here by hand, see README."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("imagehash")
pytest.importorskip("cv2")


def test_ray_engine_gives_the_local_engines_decisions(tmp_path):
    import torch
    import torchvision
    from safetensors.torch import save_file

    from firered_core.data import load_pipeline_config, run_pipeline
    from firered_core.data.planted import make_planted

    torch.manual_seed(0)
    weights = tmp_path / "mnv3.safetensors"
    save_file(torchvision.models.mobilenet_v3_small().state_dict(), str(weights))
    make_planted(tmp_path / "raw", clean=6, per_defect=1, size=96, seed=3,
                 defects=["exact_dup", "dup_jpeg", "blurred", "text", "unrelated"])
    stages = [{"kind": "dedup", "embedding": {"arch": "mobilenet_v3_small", "weights": str(weights), "size": 64,
                                              "threshold": 0.9999}},
              {"kind": "photometric"}, {"kind": "artefacts"}, {"kind": "fine_check"}]
    kw = dict(input=str(tmp_path / "raw" / "data"), analysis_size=128, stages=stages)
    local = run_pipeline(load_pipeline_config(None, output=str(tmp_path / "local"), engine={"workers": 0}, **kw))
    try:
        on_ray = run_pipeline(load_pipeline_config(None, output=str(tmp_path / "ray"),
                                                   engine={"kind": "ray", "workers": 2, "shard_size": 3}, **kw))
    finally:
        ray.shutdown()
    assert on_ray.decisions.read_bytes() == local.decisions.read_bytes()
    assert on_ray.rows_per_task == local.rows_per_task
    assert sum(1 for line in local.decisions.read_text().splitlines() if '"drop"' in line) >= 4
