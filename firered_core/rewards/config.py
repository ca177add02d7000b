"""The ``nft.reward`` config section and the reward it builds (always behind the per-sample cache)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import with_config

from ..limits import CONFIG
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
    # scores on disk (<cache_dir>/scores; None = in memory for the run only: a changed reward function is never
    # answered from an old run) and judge replies (<cache_dir>/judge; None = <output_dir>/reward_cache/judge)
    cache_dir: str | None = None


def build_reward(cfg: RewardConfig, default_dir: str | Path | None = None) -> CachedReward:
    """The configured reward wrapped in :class:`CachedReward`. Judge replies are always cached on disk (under
    ``cfg.cache_dir`` or ``default_dir``: calls cost money); scores only under an explicit ``cfg.cache_dir``."""
    if cfg.kind == "callable":
        if not cfg.callable:
            raise RewardError("reward.kind 'callable' needs reward.callable: 'package.module:function'")
        reward = CallableReward(cfg.callable)
    elif cfg.kind == "typography":
        reward = TypographyReward(cfg.typography)
    else:
        replies = cfg.cache_dir or default_dir
        reward = JudgeReward(cfg.judge, None if replies is None else Path(replies) / "judge")
    return CachedReward(reward, None if cfg.cache_dir is None else Path(cfg.cache_dir) / "scores")
