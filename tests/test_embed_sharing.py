"""Inference's embedding cache and the training extractor share one file format and key: each reuses the other's
files, and only an exact (model, instruction, VL-sized references, mode) match is reused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from firered_core.embed_cache import load_embeds
from firered_core.images import load_image
from firered_core.model import load_model
from firered_core.pipeline import EditPipeline
from firered_core.speed import ModelSettings
from firered_core.training import extract as extract_module
from firered_core.training.data import load_dataset
from firered_core.training.extract import EmbeddingStore, ExtractConfig, extract
from firered_core.training.synthetic import make_dataset

AREA = 64 * 64
EDIT = dict(steps=2, true_cfg=1.0, width=64, height=64, vae_area=AREA, seed=1, output="latent")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), rows=2, sizes=((64, 64),), sources=(1,))


@pytest.fixture(scope="module")
def row(data_dir):
    return load_dataset(str(data_dir)).samples[0]


def count_calls(module: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


def run_extraction(model_dir, data_dir, out: Path, monkeypatch) -> tuple[dict, list[int]]:
    """Extract the ``en`` variant, counting the extractor's text-encoder forwards."""
    counters: list[list[int]] = []

    def counted_load_model(*args, **kwargs):
        model = load_model(*args, **kwargs)
        counters.append(count_calls(model.text_encoder))
        return model

    monkeypatch.setattr(extract_module, "load_model", counted_load_model)
    summary = extract(ExtractConfig(model=str(model_dir), data=str(data_dir), output_dir=str(out), variants=["en"],
                                    vl_area=AREA))
    return summary, counters[0]


def edit(model_dir, row, settings: ModelSettings, vl_area: float = AREA) -> tuple[torch.Tensor, int]:
    """One edit of the row's instruction and source image; returns the latents and the text-encoder forwards."""
    model = load_model(model_dir, settings=settings)
    calls = count_calls(model.text_encoder)
    out = EditPipeline(model).edit([load_image(row.sources[0])], row.instruction, vl_area=vl_area, **EDIT)
    return out.latents, len(calls)


def test_inference_reuses_extracted_embeddings(tiny_model_dir, data_dir, row, tmp_path, monkeypatch):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "training-copy")  # the same checkpoint at another path
    summary, calls = run_extraction(copy, data_dir, tmp_path / "ext", monkeypatch)
    assert summary["prompts_encoded"] == len(calls) == 2
    store = EmbeddingStore(tmp_path / "ext")
    assert store.load(row.uid)["embeds.en"].ndim == 2
    with safe_open(str(tmp_path / "ext" / store.manifest["rows"][row.uid]), "pt") as f:
        assert list(f.keys()) == [] and "embeds.en" in f.metadata()  # a reference, not a second copy

    plain, plain_calls = edit(tiny_model_dir, row, ModelSettings(embed_cache=False))
    cached, cached_calls = edit(tiny_model_dir, row, ModelSettings(embed_cache_dir=str(tmp_path / "ext" / "embeds")))
    assert plain_calls == 1 and cached_calls == 0
    assert torch.equal(cached, plain)

    other, other_calls = edit(tiny_model_dir, row, ModelSettings(embed_cache_dir=str(tmp_path / "ext" / "embeds")),
                              vl_area=32 * 32)
    assert other_calls == 1  # another VL size is another key
    assert len(list((tmp_path / "ext" / "embeds").rglob("*.safetensors"))) == 3


def test_extraction_reuses_inference_embeddings(tiny_model_dir, data_dir, row, tmp_path, monkeypatch):
    embeds = tmp_path / "ext" / "embeds"
    _, calls = edit(tiny_model_dir, row, ModelSettings(embed_cache_dir=str(embeds)))
    (written,) = embeds.rglob("*.safetensors")
    before = written.read_bytes()
    assert calls == 1

    summary, calls = run_extraction(tiny_model_dir, data_dir, tmp_path / "ext", monkeypatch)
    assert (summary["prompts_reused"], summary["prompts_encoded"], len(calls)) == (1, 1, 1)
    assert written.read_bytes() == before
    store = EmbeddingStore(tmp_path / "ext")
    assert torch.equal(store.load(row.uid)["embeds.en"], load_embeds(written))
