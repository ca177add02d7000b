"""The one error of the LoRA package."""

from __future__ import annotations

from ..errors import FireRedError


class LoraError(FireRedError):
    """A LoRA file cannot be applied as a whole: nothing matched, a part is unmatched, or it is malformed."""
