"""A VLM-judge reward: an OpenAI-compatible endpoint rates each rollout the way the evaluation judge rates edits.

The request is the evaluation's (:func:`firered_core.evaluation.judge.judge_request`: the bench's ``judge_parts``,
by default GEdit-style "Image A (original)" / "Image B (edited)" and its 0-10 Semantic Consistency / Perceptual
Quality prompt), the reply is parsed by the evaluation's parser and the bench's sample rule gives the score, mapped
to [0, 1] by the bench's scale. Calls go through :class:`firered_core.llm.ChatClient` (retries, concurrency, call
budget, disk cache: a rerun of the same rollout costs no call). The API key is read from the environment variable
``api_key_env`` names, never from the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import Field, with_config

from ..limits import CONFIG, Count
from .base import RewardBatch, RewardError


@with_config(CONFIG)
@dataclass
class JudgeConfig:
    base_url: str = ""  # e.g. http://127.0.0.1:8000/v1
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the variable holding the key
    bench: str = "gedit"  # the judge prompt style: a built-in bench (gedit, redbench) or a bench JSON file
    prompts_file: str | None = None  # judge templates per task, for benches that read them from a file
    concurrency: Annotated[int, Field(ge=1, le=256)] = 4
    timeout_s: Annotated[float, Field(gt=0.0, le=3600.0)] = 120.0
    max_retries: Annotated[int, Field(ge=0, le=100)] = 5
    call_budget: Count | None = None  # None = unlimited


class JudgeReward:
    def __init__(self, cfg: JudgeConfig, cache_dir: str | Path | None = None, seed: int | None = 0):
        from ..evaluation.benches import load_prompts, load_spec
        from ..llm import ChatClient, ChatEndpoint

        if not cfg.base_url or not cfg.model:
            raise RewardError("reward.judge needs base_url and model (an OpenAI-compatible endpoint); the key comes "
                              f"from the environment variable {cfg.api_key_env}")
        self.spec = load_spec(cfg.bench)
        self.prompts = load_prompts(self.spec, None, cfg.prompts_file)
        self.client = ChatClient(ChatEndpoint(base_url=cfg.base_url, model=cfg.model, api_key_env=cfg.api_key_env,
                                              timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
                                              concurrency=cfg.concurrency, call_budget=cfg.call_budget,
                                              cache_dir=cache_dir), seed=seed)
        self.name = f"judge:{cfg.model}@{cfg.base_url}:{self.spec.name}"

    def __call__(self, batch: RewardBatch) -> list[float]:
        from ..evaluation.benches import prompt_for
        from ..evaluation.judge import judge_request
        from ..evaluation.scoring import criteria_for, parse_reply, sample_score
        from ..llm import ChatError

        prompts = [prompt_for(self.prompts, task, "reward.judge") for task in batch.tasks]
        criteria = [criteria_for(self.spec, p) for p in prompts]
        scores = []
        requests = [judge_request(self.spec, batch.sources[i], batch.pil(i), prompts[i], batch.prompts[i])
                    for i in range(len(batch))]
        results = [None] * len(batch)
        for crit in set(criteria):  # one concurrent map per criteria set, each with its validator
            idx = [i for i, c in enumerate(criteria) if c == crit]
            for i, result in zip(idx, self.client.map([requests[i] for i in idx], temperature=self.spec.temperature,
                                                      validate=lambda text, crit=crit: parse_reply(text, crit))):
                results[i] = result
        lo, hi = self.spec.scale
        for i, result in enumerate(results):
            if isinstance(result, ChatError):
                raise RewardError(f"reward.judge: rollout {i} ({batch.prompts[i]!r}): {result}")
            scores.append((sample_score(self.spec, result.value.scores) - lo) / (hi - lo))
        return scores
