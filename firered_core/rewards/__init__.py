"""Rewards for online RL (:mod:`firered_core.training.nft`): plug-ins that score decoded edits.

A reward maps a :class:`~.base.RewardBatch` (images, instructions, sources) to one score per image. Built in: any
Python callable (:mod:`.base`), a typography-aware OCR reward (:mod:`.typography`, engines in :mod:`.ocr`) and a
VLM judge through an OpenAI-compatible endpoint (:mod:`.judge`). :func:`.config.build_reward` makes one from the
training config; every reward is wrapped in a per-sample cache keyed by content.
"""

from .base import CachedReward, CallableReward, Reward, RewardBatch, RewardError
from .config import RewardConfig, build_reward

__all__ = ["CachedReward", "CallableReward", "Reward", "RewardBatch", "RewardConfig", "RewardError", "build_reward"]
