"""A LoRA's own sampling schedule: the fixed sigmas (and CFG setting) a few-step distilled LoRA was trained for.

The distillation trainer (:mod:`firered_core.training.distill`) writes it into the safetensors metadata of both
exports (ComfyUI and diffusers key styles) under :data:`SCHEDULE_KEY`, as JSON::

    {"steps": 8, "sigmas": [1.0, ..., 0.0], "true_cfg": 1.0, "teacher_steps": 40, "teacher_cfg": 4.0}

``firered-edit`` and the FireRed Sampler node read it back when such a LoRA is applied, and sample with exactly
those sigmas and CFG off. A malformed schedule is refused with one line naming the file: sampling a distilled LoRA
on another schedule would silently give worse pictures.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LoraError

SCHEDULE_KEY = "firered_schedule"


@dataclass(frozen=True)
class LoraSchedule:
    """``steps`` Euler steps over ``sigmas`` (``steps + 1`` values from high noise down to 0) at ``true_cfg``."""

    steps: int
    sigmas: tuple[float, ...]
    true_cfg: float = 1.0
    teacher_steps: int | None = None
    teacher_cfg: float | None = None
    source: str = ""

    def __post_init__(self):
        where = f"LoRA {self.source}: " if self.source else ""
        s = self.sigmas
        if not isinstance(self.steps, int) or self.steps < 1 or len(s) != self.steps + 1:
            raise LoraError(f"{where}schedule has steps={self.steps!r} but {len(s)} sigmas (need steps + 1)")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in s) or not 0 < s[0] <= 1 or s[-1] != 0:
            raise LoraError(f"{where}schedule sigmas {list(s)} must be finite, start in (0, 1] and end at 0")
        if any(b >= a for a, b in zip(s, s[1:])):
            raise LoraError(f"{where}schedule sigmas {list(s)} must decrease strictly")
        if not (isinstance(self.true_cfg, (int, float)) and 0 <= self.true_cfg <= 100):
            raise LoraError(f"{where}schedule true_cfg {self.true_cfg!r} is not a number in 0..100")

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata entry that carries this schedule."""
        body = {"steps": self.steps, "sigmas": list(self.sigmas), "true_cfg": self.true_cfg}
        if self.teacher_steps is not None:
            body.update(teacher_steps=self.teacher_steps, teacher_cfg=self.teacher_cfg)
        return {SCHEDULE_KEY: json.dumps(body)}

    @classmethod
    def from_metadata(cls, meta: dict | None, source: str = "") -> LoraSchedule | None:
        """The schedule in a file's metadata (None when it carries none); :class:`LoraError` when it is malformed."""
        text = (meta or {}).get(SCHEDULE_KEY)
        if text is None:
            return None
        try:
            body = json.loads(text)
            return cls(steps=body["steps"], sigmas=tuple(float(v) for v in body["sigmas"]),
                       true_cfg=float(body.get("true_cfg", 1.0)), teacher_steps=body.get("teacher_steps"),
                       teacher_cfg=body.get("teacher_cfg"), source=source)
        except (ValueError, KeyError, TypeError) as exc:
            raise LoraError(f"LoRA {source}: metadata {SCHEDULE_KEY!r} is not a valid schedule ({exc})") from None

    def tensor(self, denoise: float = 1.0) -> torch.Tensor:
        """The sigmas to sample with; with ``denoise`` < 1 the last ``round(steps * denoise)`` steps (at least 1)."""
        take = self.steps if denoise >= 1.0 else max(1, round(self.steps * denoise))
        return torch.tensor(self.sigmas[-(take + 1):], dtype=torch.float32)

    def describe(self) -> str:
        sig = ", ".join(f"{v:.3f}" for v in self.sigmas)
        teacher = (f"; distilled from {self.teacher_steps} steps at true CFG {self.teacher_cfg:g}"
                   if self.teacher_steps else "")
        return f"{self.steps} steps, true CFG {self.true_cfg:g}, sigmas [{sig}]{teacher}"


def read_schedule(path: str | Path) -> LoraSchedule | None:
    """The schedule saved in a LoRA file (or a PEFT adapter folder's weights), None when it has none."""
    from safetensors import safe_open

    from .files import adapter_weights

    path = Path(path)
    file = adapter_weights(path) if path.is_dir() else path
    if file.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(file), "pt") as fh:
            meta = fh.metadata()
    except Exception as exc:  # noqa: BLE001 (reading the weights names the real problem; this is metadata only)
        raise LoraError(f"LoRA {file}: cannot read its metadata ({exc})") from None
    return LoraSchedule.from_metadata(meta, file.name)


def schedule_of(specs: Sequence, inherited: LoraSchedule | None = None) -> LoraSchedule | None:
    """The one schedule the LoRAs ``specs`` (and ``inherited``, from LoRAs applied before) carry; LoRAs with
    different schedules cannot be sampled together faithfully and are refused."""
    found = [inherited] if inherited is not None else []
    for spec in specs:
        path = getattr(spec, "path", spec)
        if path is not None and getattr(spec, "state_dict", None) is None:
            sched = read_schedule(path)
            if sched is not None:
                found.append(sched)
    for other in found[1:]:
        if (other.steps, other.sigmas, other.true_cfg) != (found[0].steps, found[0].sigmas, found[0].true_cfg):
            raise LoraError(f"LoRAs {found[0].source} and {other.source} were distilled for different sampling "
                            f"schedules ({found[0].describe()} / {other.describe()}): apply only one of them")
    return found[0] if found else None


def model_schedule(model) -> LoraSchedule | None:
    """The schedule of the LoRAs applied to ``model`` (a :class:`FireRedModel` or LoRA view), if any."""
    return getattr(model, "lora_schedule", None)
