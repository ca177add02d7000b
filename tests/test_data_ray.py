"""The Ray Data engine (local Ray, 2 workers) gives the same decisions.jsonl as the local engine: a model stage
(an embedding descriptor; on CPU Ray runs it as tasks, the model cached per worker) and a fitted stage
(photometric quantiles), over a small planted set several shards long. Skipped when ray is not installed
(``ray[data]`` is in the ``dev`` and ``data`` extras). One ray.init, 2 CPUs, no dashboard: most of the time is
Ray's and its workers' start-up (importing torch), see docs/benchmarks.md. The GPU actor pool's scorer is tested
without Ray in test_data_tools.py."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("imagehash")


@pytest.fixture(scope="module")
def local_ray():
    from firered_core.data.engines import start_ray
    from firered_core.data.config import EngineConfig

    start_ray(EngineConfig(kind="ray", workers=2))
    yield
    ray.shutdown()


def test_ray_engine_gives_the_local_engines_decisions(tmp_path, local_ray):
    import torch
    import torchvision
    from safetensors.torch import save_file

    from firered_core.data import load_pipeline_config, run_pipeline
    from firered_core.data.planted import make_planted

    torch.manual_seed(0)
    weights = tmp_path / "mnv3.safetensors"
    save_file(torchvision.models.mobilenet_v3_small().state_dict(), str(weights))
    make_planted(tmp_path / "raw", clean=5, per_defect=1, size=64, seed=3,
                 defects=["exact_dup", "dup_jpeg", "blurred", "underexposed", "colour_cast", "mosaic"])
    stages = [{"kind": "dedup", "embedding": {"arch": "mobilenet_v3_small", "weights": str(weights), "size": 32,
                                              "threshold": 0.9999}},
              {"kind": "photometric"}, {"kind": "quality", "global_tasks": ["style"]},
              {"kind": "artefacts", "text": None, "codes": False}]
    kw = dict(input=str(tmp_path / "raw" / "data"), analysis_size=64, stages=stages)
    local = run_pipeline(load_pipeline_config(None, output=str(tmp_path / "local"), engine={"workers": 0}, **kw))
    on_ray = run_pipeline(load_pipeline_config(None, output=str(tmp_path / "ray"),
                                               engine={"kind": "ray", "workers": 2, "shard_size": 3}, **kw))
    assert on_ray.decisions.read_bytes() == local.decisions.read_bytes()
    assert on_ray.rows_per_task == local.rows_per_task
    drops = [line for line in local.decisions.read_text().splitlines() if '"drop"' in line]
    assert len(drops) >= 5, drops
