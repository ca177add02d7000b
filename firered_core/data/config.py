"""The data pipeline's configuration: YAML or TOML, typed and validated (pydantic v2), with ranges and defaults.

``stages`` is an ordered list; each entry's ``kind`` picks the stage and ``name`` (default: the kind) names it in
``decisions.jsonl`` and the report. Overrides on the command line: ``key.sub=value``; stages are addressed by name
or index (``stages.photometric.fence=2.5``, ``stages.0.hash_bits=8``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..training.config import read_config_file
from .extras import DataToolError


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EngineConfig(_Model):
    kind: Literal["local", "ray"] = "local"
    workers: int = Field(2, ge=0, le=1024, description="processes (local; 0 = in this process) or Ray concurrency")
    shard_size: int = Field(64, ge=1, le=1_000_000, description="rows per shard: the unit of work and of resume")
    address: str | None = Field(None, description="Ray cluster address; None starts a local Ray")
    gpus_per_actor: float = Field(0.0, ge=0, le=16, description="Ray: GPUs per actor of stages that run a model "
                                  "(> 0: an actor pool, one model per GPU actor; 0: CPU tasks, one model per worker)")


class EmbeddingConfig(_Model):
    """A user image model for copy-detection-style descriptors (penultimate features, L2-normalised)."""

    library: Literal["torchvision", "timm", "open_clip"] = Field(
        "torchvision", description="which package builds arch (timm / open_clip only when installed)")
    arch: str = Field("resnet18", description="model name in that library (open_clip: or a model-config .json)")
    weights: str = Field(..., description="safetensors file, or a weights-only .pt/.pth state dict")
    size: int = Field(224, ge=16, le=1024)
    device: str = "cpu"
    threshold: float = Field(0.95, ge=-1, le=1, description="cosine similarity at or above which images match")


class _Stage(_Model):
    name: str = ""

    @model_validator(mode="after")
    def _default_name(self):
        if not self.name:
            self.name = self.kind  # type: ignore[attr-defined]
        return self


class DedupConfig(_Stage):
    """Level 1: exact duplicates by pixel hash, then near duplicates (pHash bits and/or embeddings -> kNN ->
    clusters); the best row of each cluster (resolution, then sharpness) is kept."""

    kind: Literal["dedup"] = "dedup"
    exact: bool = True
    hash_bits: int = Field(12, ge=0, le=64, description="near duplicate when every image's pHash differs <= this")
    use_hashes: bool = True
    neighbours: int = Field(16, ge=1, le=1000, description="k of the kNN search")
    embedding: EmbeddingConfig | None = None


class PairCheckConfig(_Stage):
    """Level 2 (coarse: hashes and thumbnails): trivial edits (target ~= a source) and unrelated pairs (target
    shares nothing with any source; not applied to global_tasks). A pair is dropped only when pHash, the thumbnail
    SSIM and (when configured) the embedding all agree."""

    kind: Literal["pair_check"] = "pair_check"
    trivial_bits: int = Field(2, ge=0, le=64, description="pHash and dHash both within this ...")
    trivial_thumb: float = Field(16.0, ge=0, le=255, description="... and no thumbnail pixel differs more ...")
    trivial_ssim: float = Field(0.97, ge=-1, le=1, description="... and 64 px thumbnails' SSIM at least this: trivial")
    unrelated_bits: int = Field(30, ge=0, le=64, description="pHash of the target this far from every source ...")
    unrelated_ssim: float = Field(0.5, ge=-1, le=1, description="... and 64 px thumbnail SSIM below this to every "
                                                                "source (and, with an embedding, cosine below its "
                                                                "threshold): unrelated")
    embedding: EmbeddingConfig | None = Field(None, description="a third opinion: both checks must agree with it")
    global_tasks: list[str] = Field(default_factory=list, description="tasks that may change the whole image")


class FineCheckConfig(_Stage):
    """Level 3 (fine, on the survivors, at analysis size): trivial when no patch changed (luma 8x8, mean colour
    16x16) by more than ``trivial_local`` or PSNR and SSIM are both above their limits; unrelated when SSIM is
    below ``unrelated_ssim`` and the pHash distance at least ``unrelated_bits`` (not for global_tasks)."""

    kind: Literal["fine_check"] = "fine_check"
    trivial_local: float = Field(7.0, ge=0, le=255, description="largest local change (descriptors.local_change, "
                                 "0..255); on the tuning photographs a re-render (JPEG q >= 88, +-0.05 stop) moves "
                                 "<= 3.8, their visible clean edits >= 11")
    trivial_psnr: float = Field(40.0, ge=0, le=100)
    trivial_ssim: float = Field(0.98, ge=-1, le=1)
    unrelated_ssim: float = Field(0.5, ge=-1, le=1)
    unrelated_bits: int = Field(16, ge=0, le=64)
    global_tasks: list[str] = Field(default_factory=list)


class Tail(_Model):
    low: float | None = Field(None, ge=0, le=0.5, description="largest share the low tail may drop")
    high: float | None = Field(None, ge=0, le=0.5, description="largest share the high tail may drop")


def _tails() -> dict[str, Tail]:
    return {"brightness": Tail(low=0.05, high=0.05), "saturation": Tail(low=0.05), "entropy": Tail(low=0.05),
            "texture": Tail(low=0.05), "sharpness": Tail(low=0.05), "blockiness": Tail(high=0.05),
            "cast": Tail(high=0.05)}


class PhotometricConfig(_Stage):
    """Fit each descriptor on the data set; drop values beyond BOTH the configured quantile and ``fence`` robust
    deviations (median +- fence * 1.4826 * MAD). fence 0 = the plain quantile cut."""

    kind: Literal["photometric"] = "photometric"
    descriptors: dict[str, Tail] = Field(default_factory=_tails)
    fence: float = Field(5.0, ge=0, le=20)

    @model_validator(mode="after")
    def _known(self):
        from .descriptors import PHOTOMETRIC

        unknown = set(self.descriptors) - set(PHOTOMETRIC)
        if unknown:
            raise ValueError(f"unknown descriptor(s) {sorted(unknown)}; known: {list(PHOTOMETRIC)}")
        return self


class QualityConfig(_Stage):
    """Pair-aware quality: the target against its own source outside the edited region (firered_core/data/
    pairquality.py); a score beyond its limit drops the row (None = that check off). The defaults are the values
    tuned on the tuning photographs (benchmarks/tune_filters.py); training/configs/curate.yaml ships the same."""

    kind: Literal["quality"] = "quality"
    exposure_up: float | None = Field(0.406, ge=0, le=8, description="stops brighter than the source")
    exposure_down: float | None = Field(0.342, ge=0, le=8, description="stops darker than the source")
    clip: float | None = Field(0.0218, ge=0, le=1, description="extra share of pixels blown out / crushed")
    cast: float | None = Field(2.66, ge=0, le=200, description="CIELAB a*/b* shift of the unedited part")
    wb: float | None = Field(0.0834, ge=0, le=5, description="per-channel log gain off the mean gain")
    blur: float | None = Field(0.0499, ge=0, le=10, description="log detail lost in textured cells")
    noise: float | None = Field(5.74, ge=0, le=255, description="added noise outside the edit: Gaussian sigma "
                                "(levels) of the target's fine detail its source does not explain")
    blocky: float | None = Field(0.374, ge=0, le=100, description="JPEG block-grid ratio added")
    global_tasks: list[str] = Field(default_factory=list, description="tasks that change the whole picture "
                                                                      "(judged by the dataset tails only)")


class ArtefactConfig(_Stage):
    """Heuristics: overlay text / watermark, mosaic, collage borders, QR codes and barcodes (OpenCV). text, mosaic
    defaults: tuned on the tuning photographs (benchmarks/tune_filters.py). collage keeps its earlier limit: in a
    pair it counts only border the source lacks (no photograph collage class was planted)."""

    kind: Literal["artefacts"] = "artefacts"
    text: float | None = Field(8.67, ge=0, description="most stroke crossings along one text-line blob (in a pair: "
                               "of the target - source difference); None = off")
    mosaic: float | None = Field(14.4, ge=0, description="block-grid edge ratio, best window; None = off")
    collage: float | None = Field(0.62, ge=0, le=1, description="share of a straight internal line that is a "
                                                                 "strong edge; None = off")
    codes: bool = True


class MaskPairsConfig(_Stage):
    """Synthetic pairs from (image, mask, label[, label_cn]) records: a remove pair and an add pair each."""

    kind: Literal["mask_pairs"] = "mask_pairs"
    masks: str = Field(..., description="JSONL of {image, mask, label, label_cn?}; paths relative to it")
    mode: Literal["paste", "inpaint"] = "paste"
    remove_task: str = "remove"
    add_task: str = "add"
    seed: int = 0


class InvertConfig(_Stage):
    """Task inversion: rows with an inverse_instruction also train target -> source."""

    kind: Literal["invert"] = "invert"
    tasks: list[str] | None = None
    task: str | None = Field(None, description="task of the inverted rows; None = the row's own task")


class NegativesConfig(_Stage):
    """Hard negatives: one colour / object / count word of the instruction swapped (written to negatives/)."""

    kind: Literal["hard_negatives"] = "hard_negatives"
    per_row: int = Field(1, ge=1, le=8)
    seed: int = 0


class SampleConfig(_Stage):
    """Stratified balanced sampling by task, source count and de-dup cluster."""

    kind: Literal["sample"] = "sample"
    target: int | None = Field(None, ge=1, description="rows to keep in all; None = as many as the mixture allows")
    mixture: dict[str, float] | None = Field(None, description="task -> share; None = equal shares")
    by: list[Literal["task", "sources", "cluster"]] = Field(default_factory=lambda: ["task", "sources", "cluster"])
    seed: int = 0


class SplitTasksConfig(_Stage):
    """Multi-operation instructions split by an OpenAI-compatible chat endpoint (the key from the environment
    variable ``api_key_env``; replies cached on disk, retried)."""

    kind: Literal["split_tasks"] = "split_tasks"
    base_url: str = Field(..., description="e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    model: str = Field(..., min_length=1)
    api_key_env: str = "OPENAI_API_KEY"
    max_ops: int = Field(4, ge=2, le=16)
    only_hinted: bool = Field(True, description="ask only for instructions with a conjunction or list separator")
    max_retries: int = Field(3, ge=0, le=20)
    concurrency: int = Field(4, ge=1, le=64)
    call_budget: int | None = Field(None, ge=0)
    timeout_s: float = Field(120.0, gt=0, le=3600)
    cache_dir: str | None = Field(None, description="None: <output>/.work/llm-cache")


StageConfig = Annotated[Union[DedupConfig, PairCheckConfig, FineCheckConfig, PhotometricConfig, QualityConfig,
                              ArtefactConfig,
                              MaskPairsConfig, InvertConfig, NegativesConfig, SplitTasksConfig, SampleConfig],
                        Field(discriminator="kind")]


class ReportConfig(_Model):
    thumbnails: int = Field(48, ge=0, le=1000, description="dropped rows shown per stage (and half as many "
                                                           "borderline ones)")
    thumb_size: int = Field(96, ge=16, le=512)


class PipelineConfig(_Model):
    input: str | list[str]
    output: str
    engine: EngineConfig = Field(default_factory=EngineConfig)
    analysis_size: int = Field(512, ge=32, le=8192, description="longest side images are measured at")
    report: ReportConfig = Field(default_factory=ReportConfig)
    stages: list[StageConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self):
        names = [s.name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"stage names must be unique; repeated: {dup} (give each a 'name')")
        return self


def _override(tree: dict, dotted: str, value) -> None:
    node = tree
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if part.isdigit() and int(part) < len(node):
                idx = int(part)
            else:
                match = [k for k, s in enumerate(node) if isinstance(s, dict) and s.get("name", s.get("kind")) == part]
                if not match:
                    raise DataToolError(f"override {dotted!r}: no stage named {part!r}")
                idx = match[0]
            if last:
                node[idx] = value
            node = node[idx]
        else:
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, [] if part == "stages" else {})


def load_pipeline_config(path: str | Path | None = None, overrides: list[str] | None = None,
                         **values) -> PipelineConfig:
    """Config file (YAML / TOML), then ``key.sub=value`` overrides (values parsed as YAML), then keyword values."""
    where = str(path) if path else "config"
    try:
        tree = read_config_file(path) if path else {}
    except (OSError, yaml.YAMLError, ValueError) as exc:
        raise DataToolError(f"cannot read config {where}: {exc}") from None
    for item in overrides or []:
        if "=" not in item:
            raise DataToolError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        _override(tree, key.strip(), yaml.safe_load(raw))
    for key, value in values.items():
        _override(tree, key, value)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise DataToolError(f"{where}: {problems}") from None


def stage_fingerprint(cfg: PipelineConfig) -> str:
    """What a resumed run must share with the first one (engine and report settings may change)."""
    return json.dumps({"input": cfg.input, "analysis_size": cfg.analysis_size, "shard_size": cfg.engine.shard_size,
                       "stages": [s.model_dump() for s in cfg.stages]}, sort_keys=True)
