"""The ``nft.reward`` config section and the reward it builds (always behind the per-sample cache)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import with_config

from ..validation import CONFIG
from .base import CachedReward, CallableReward, RewardError
from .judge import JudgeConfig, JudgeReward
from .typography import TypographyConfig, TypographyReward


@with_config(CONFIG)
@dataclass
class RewardConfig:
    kind: Literal["callable", "typography", "judge"] = "callable"
    callable: str = ""  # kind callable: "package.module:function", f(images [N,3,H,W] 0..1, prompts) -> N scores
    typography: TypographyConfig = field(default_factory=TypographyConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    cache_dir: str | None = None  # scores (and judge replies) on disk; None = <output_dir>/reward_cache


def build_reward(cfg: RewardConfig, cache_dir: str | Path | None = None) -> CachedReward:
    """The configured reward wrapped in :class:`CachedReward` (scores cached under ``cache_dir`` when given)."""
    if cfg.kind == "callable":
        if not cfg.callable:
            raise RewardError("reward.kind 'callable' needs reward.callable: 'package.module:function'")
        reward = CallableReward(cfg.callable)
    elif cfg.kind == "typography":
        reward = TypographyReward(cfg.typography)
    else:
        reward = JudgeReward(cfg.judge, None if cache_dir is None else Path(cache_dir) / "judge")
    return CachedReward(reward, None if cache_dir is None else Path(cache_dir) / "scores")
