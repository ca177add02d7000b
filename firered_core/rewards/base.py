"""The reward plug-in interface, the ``module:function`` reward and the per-sample reward cache."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import FireRedError
from ..plugins import import_object


class RewardError(FireRedError):
    """A reward that cannot be built or that returned something other than one finite score per image."""


@dataclass
class RewardBatch:
    """What a reward scores: ``images`` [N, 3, H, W] float in 0..1 on the CPU, the instruction of each image and the
    source pictures it was edited from (empty for text-to-image) and each row's task (the judge picks its prompt by
    task; ``"*"`` = any)."""

    images: torch.Tensor
    prompts: list[str]
    sources: list[list[Image.Image]] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.images.dim() != 4 or self.images.shape[1] != 3:
            raise RewardError(f"reward images must be [N, 3, H, W], got {list(self.images.shape)}")
        if len(self.prompts) != len(self.images):
            raise RewardError(f"{len(self.images)} images but {len(self.prompts)} prompts")
        if not self.sources:
            self.sources = [[] for _ in self.prompts]
        if not self.tasks:
            self.tasks = ["*"] * len(self.prompts)

    def __len__(self) -> int:
        return len(self.images)

    def pil(self, i: int) -> Image.Image:
        """Image ``i`` as an 8-bit RGB picture (what OCR engines and judges see)."""
        return Image.fromarray(uint8_array(self.images[i]))


def uint8_array(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] in 0..1 -> [H, W, 3] uint8 (rounded, as a saved PNG would be)."""
    return (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


class Reward(Protocol):
    """``name`` identifies the scoring (part of the cache key); calling scores every image of the batch."""

    name: str

    def __call__(self, batch: RewardBatch) -> Sequence[float]: ...


class CallableReward:
    """Any Python function ``f(images, prompts) -> scores``: images a float tensor [N, 3, H, W] in 0..1, prompts a
    list of N strings, scores N numbers (higher is better)."""

    def __init__(self, fn: Callable | str):
        self.fn = import_object(fn, "reward.callable", RewardError) if isinstance(fn, str) else fn
        if not callable(self.fn):
            raise RewardError(f"reward.callable {fn!r} is not callable")
        self.name = f"callable:{fn}" if isinstance(fn, str) else f"callable:{getattr(fn, '__qualname__', fn)}"

    def __call__(self, batch: RewardBatch) -> list[float]:
        return list(self.fn(batch.images, list(batch.prompts)))


def content_key(reward_name: str, image: torch.Tensor, prompt: str, sources: list[Image.Image]) -> str:
    """SHA-256 of the reward's name, the 8-bit image, its instruction and its sources: the same rollout (same
    pixels, same request) is scored once."""
    digest = hashlib.sha256(reward_name.encode())
    arr = uint8_array(image)
    digest.update(str(arr.shape).encode() + arr.tobytes())
    digest.update(prompt.encode())
    for src in sources:
        digest.update(src.mode.encode() + str(src.size).encode() + src.tobytes())
    return digest.hexdigest()


class CachedReward:
    """A reward scored once per distinct sample: in memory for the run, and on disk under ``cache_dir`` (atomic
    JSON files, :class:`firered_core.llm.ChatCache`) when given, so a rerun or a resumed run rescores nothing.
    ``calls`` counts the samples actually sent to the wrapped reward."""

    def __init__(self, reward: Reward, cache_dir: str | Path | None = None):
        from ..llm import ChatCache

        self.reward, self.name = reward, reward.name
        self.memory: dict[str, float] = {}
        self.disk = ChatCache(cache_dir) if cache_dir else None
        self.calls = 0

    def _lookup(self, key: str) -> float | None:
        if key in self.memory:
            return self.memory[key]
        text = self.disk.get(key) if self.disk is not None else None
        return None if text is None else float(text)

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        keys = [content_key(self.name, batch.images[i], batch.prompts[i] + "\0" + batch.tasks[i], batch.sources[i])
                for i in range(len(batch))]
        scores = [self._lookup(k) for k in keys]
        first: dict[str, int] = {}
        for i, s in enumerate(scores):
            if s is None:
                first.setdefault(keys[i], i)
        todo = list(first.values())  # each missing sample once, even when a batch repeats it
        if todo:
            sub = RewardBatch(batch.images[todo], [batch.prompts[i] for i in todo], [batch.sources[i] for i in todo],
                              [batch.tasks[i] for i in todo])
            fresh = [float(s) for s in self.reward(sub)]
            if len(fresh) != len(todo) or not all(math.isfinite(s) for s in fresh):
                raise RewardError(f"reward {self.name} returned {fresh!r} for {len(todo)} image(s): expected one "
                                  "finite number per image")
            self.calls += len(todo)
            for i, s in zip(todo, fresh):
                scores[i] = self.memory[keys[i]] = s
                if self.disk is not None:
                    self.disk.put(keys[i], repr(s), self.name)
            scores = [self.memory[k] if s is None else s for k, s in zip(keys, scores)]
        return torch.tensor(scores, dtype=torch.float64)
