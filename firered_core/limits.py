"""The numbers a user may give, with their allowed ranges, checked in one place (pydantic) by every front end.

:data:`LIMITS` states each number once: the CLI checks its options with :func:`check` (spelled ``--flag``), the
nodes check their inputs with it (spelled ``input 'name'``) and take their widget ranges from :func:`widget`, and
the training config uses the same annotated types (:func:`annotated`). A value outside its range, NaN, infinity or
the wrong type is a :class:`OptionError` naming the option, the value and the allowed range; nothing is silently
replaced by a default.

:func:`require_finite` is the other guard against silent black images: NaN / inf tensors are refused where they
enter (a LATENT) and before they are decoded, with what they are named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Callable

import torch
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from .errors import InputError

MAX_SEED = 2**64 - 1
MAX_SIDE = 8192  # pixels; larger outputs need more memory than any single accelerator has (see side_memory_note)
HIDDEN_BYTES = 3072 * 2  # one bf16 hidden state of the 20B transformer per image token


class OptionError(InputError):
    """A number given by the user is out of range, not finite or of the wrong type (``field``: the option)."""


@dataclass(frozen=True)
class Limit:
    """An option's type and inclusive range (``multiple``: the value must be a multiple of it)."""

    kind: type
    lo: float
    hi: float
    meaning: str
    multiple: int | None = None

    def describe(self) -> str:
        def fmt(v: float) -> str:
            return str(int(v)) if float(v).is_integer() else f"{v:g}"

        text = f"{'a number' if self.kind is float else 'an integer'} in {fmt(self.lo)}..{fmt(self.hi)}"
        return text + (f", a multiple of {self.multiple}" if self.multiple else "")


LIMITS: dict[str, Limit] = {
    "steps": Limit(int, 1, 1000, "sampling steps"),
    "true_cfg": Limit(float, 0.0, 100.0, "true CFG scale (<= 1 disables it)"),
    "seed": Limit(int, 0, MAX_SEED, "random seed"),
    "width": Limit(int, 16, MAX_SIDE, "output width in pixels", 16),
    "height": Limit(int, 16, MAX_SIDE, "output height in pixels", 16),
    "side": Limit(int, 16, MAX_SIDE, "output side in pixels (padded up to a multiple of 16)"),
    "num_images": Limit(int, 1, 64, "images per prompt"),
    "shift": Limit(float, 0.0, 20.0, "constant schedule shift (0 = the dynamic shift)"),
    "denoise": Limit(float, 0.01, 1.0, "share of the schedule run from the input latent"),
    "vl_area": Limit(float, 32 * 32, 2048 * 2048, "pixel area of the references for the VL encoder"),
    "vae_area": Limit(float, 32 * 32, 4096 * 4096, "pixel area of the references for the VAE"),
    "vl_size": Limit(int, 32, 2048, "side of the VL copy's square area"),
    "vae_size": Limit(int, 64, 4096, "side of the VAE copy's square area"),
    "megapixels": Limit(float, 0.01, 16.0, "output area in units of 1024x1024 pixels"),
    "pack_megapixels": Limit(float, 0.05, 16.0, "area of each packed composite in units of 1024x1024 pixels"),
    "lora_strength": Limit(float, -10.0, 10.0, "LoRA strength"),
    "stitch_size": Limit(int, 16, 4096, "stitched picture size"),
    "stitch_gap": Limit(int, 0, 256, "gap between stitched pictures"),
    "feather": Limit(int, 0, 512, "pixels over which a masked edit fades in inside the mask"),
}


def annotated(name: str | Limit, strict: bool = True) -> Any:
    """``Annotated[type, Field(...)]`` for ``LIMITS[name]`` (or a :class:`Limit`; used by pydantic models and
    dataclasses).

    ``strict=False`` lets pydantic read numbers from strings (config files and ``key=value`` overrides).
    """
    lim = LIMITS[name] if isinstance(name, str) else name
    extra = {"allow_inf_nan": False} if lim.kind is float else {"strict": strict}
    return Annotated[lim.kind, Field(ge=lim.lo, le=lim.hi, multiple_of=lim.multiple, **extra)]


# Typed fields of config dataclasses (validated by pydantic at the edge, see firered_core/training/config.py).
CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True)
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0.0)]
NonNegative = Annotated[float, Field(ge=0.0)]


_ADAPTERS: dict[Limit, TypeAdapter] = {}


def side_memory_note(width: int, height: int) -> str:
    """What an output of that size would need: one transformer hidden state alone (bf16)."""
    tokens = (width // 16) * (height // 16)
    return f"a {width}x{height} output is {tokens} image tokens; one bf16 hidden state alone needs " \
           f"{tokens * HIDDEN_BYTES / 2**30:.1f} GiB"


def _message(name: str, value: Any, lim: Limit) -> str:
    text = f"{value!r} is not allowed: {lim.meaning} must be {lim.describe()}"
    if name in ("width", "height") and isinstance(value, int) and value > lim.hi:
        text += f" ({side_memory_note(value, value)})"
    return text


def check_value(name: str, value: Any, table: dict[str, Limit] | None = None) -> Any:
    """``value`` validated against ``table[name]`` (default :data:`LIMITS`); raise :class:`OptionError` (without
    the option's name)."""
    lim = (LIMITS if table is None else table)[name]
    if lim not in _ADAPTERS:
        _ADAPTERS[lim] = TypeAdapter(annotated(lim))
    if isinstance(value, bool):  # True is an int to Python, never a number to a user
        raise OptionError(_message(name, value, lim))
    if lim.kind is float and isinstance(value, int):
        value = float(value)
    try:
        return _ADAPTERS[lim].validate_python(value)
    except ValidationError:
        raise OptionError(_message(name, value, lim)) from None


def check(values: dict[str, Any], spell: Callable[[str], str] = lambda name: name,
          limits: dict[str, str] | None = None, table: dict[str, Limit] | None = None) -> dict[str, Any]:
    """Validate every non-None value; the error names the option as ``spell(name)`` says (``--steps``).

    ``limits`` maps an option name to the :data:`LIMITS` entry it uses when the two differ (``strength`` ->
    ``lora_strength``); ``table`` replaces :data:`LIMITS` (the speed options keep theirs in
    :data:`firered_core.options.LIMITS`).
    """
    out = {}
    for name, value in values.items():
        if value is None:
            out[name] = value
            continue
        try:
            out[name] = check_value((limits or {}).get(name, name), value, table)
        except OptionError as exc:
            raise OptionError(f"{spell(name)} {exc}", field=name) from None
    return out


def widget(name: str) -> dict:
    """ComfyUI widget bounds (``min``, ``max``, and ``step`` for multiples) of ``LIMITS[name]``."""
    lim = LIMITS[name]
    out: dict = {"min": lim.kind(lim.lo), "max": lim.kind(lim.hi)}
    if lim.multiple:
        out["step"] = lim.multiple
    return out


def require_finite(tensor: torch.Tensor, what: str, hint: str = "") -> torch.Tensor:
    """Return ``tensor`` unless it holds NaN or infinity; then raise naming ``what`` and how many values are bad."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        nan = int(torch.isnan(tensor).sum())
        raise OptionError(f"{what} holds {bad} non-finite value(s) of {tensor.numel()} ({nan} NaN, {bad - nan} "
                          f"inf){': ' + hint if hint else ''}")
    return tensor


def finite_number(value: float, what: str) -> float:
    """Refuse NaN / inf for a scalar that has no range of its own."""
    if not math.isfinite(value):
        raise OptionError(f"{what} {value!r} is not a finite number")
    return value
