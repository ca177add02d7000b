"""The stage registry: config kind -> stage class."""

from __future__ import annotations

from ..config import PipelineConfig
from .artefacts import ArtefactStage
from .base import Context, Stage, StageResult
from .dedup import DedupStage
from .pairs import FineCheckStage, PairCheckStage
from .photometric import PhotometricStage
from .quality import QualityStage
from .sample import SampleStage
from .split import SplitTasksStage
from .synthetic import InvertStage, MaskPairsStage, NegativesStage

STAGES: dict[str, type[Stage]] = {cls.kind: cls for cls in (
    DedupStage, PairCheckStage, FineCheckStage, PhotometricStage, QualityStage, ArtefactStage, MaskPairsStage,
    InvertStage, NegativesStage, SplitTasksStage, SampleStage)}


def build_stage(config: dict, context: dict) -> Stage:
    """A stage from its config as a dict (what travels to workers) and the run context."""
    from pydantic import TypeAdapter

    from ..config import StageConfig

    cfg = TypeAdapter(StageConfig).validate_python(config)
    return STAGES[cfg.kind](cfg, Context(**context))


__all__ = ["STAGES", "Context", "PipelineConfig", "Stage", "StageResult", "build_stage"]
