"""Data-curation tools for FireRed edit-pair data sets (the ``firered-data`` command).

A pipeline of stages over rows of the trainer's JSONL format: three-level de-duplication (``dedup``,
``pair_check``, ``fine_check``), photometric filters fitted on the data set, artefact heuristics, synthetic pairs
(``mask_pairs``, ``invert``, ``hard_negatives``) and stratified balanced sampling. Scoring runs in a local worker
pool or on Ray Data (identical decisions); decisions are made on the driver, recorded in ``decisions.jsonl`` and
shown in a per-stage HTML report. Everything streams shard by shard through JSONL work files; what a stage needs
of the whole data set is kept as compact numpy columns spilled to disk (:mod:`.spill`). Optional packages: the
``data`` extra.
"""

from .config import PipelineConfig, load_pipeline_config
from .extras import DataToolError, MissingExtra
from .pipeline import RunResult, run_pipeline

__all__ = ["DataToolError", "MissingExtra", "PipelineConfig", "RunResult", "load_pipeline_config", "run_pipeline"]
