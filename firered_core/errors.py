"""The one base of every error that means "the input is wrong" (a file, a number, an image, a config key).

Front ends (the CLI, the nodes, the training scripts) turn a ``FireRedError`` into one clear line for the user;
anything else is a bug and keeps its traceback. ``field`` names the setting, option or input at fault when the
error is about one, so a front end can point at it (a node blames that input, not a guess made before the call).
"""

from __future__ import annotations


class FireRedError(ValueError):
    """Bad input: the message names the file, key or value at fault and what would be accepted."""

    def __init__(self, message: str = "", *, field: str | None = None):
        super().__init__(message)
        self.field = field


class InputError(FireRedError):
    """A value given to the library (a size, a mode, a count) is out of range or not one of the accepted ones."""


class ConfigError(FireRedError):
    """A training config key is unknown, its value does not fit the key's type or range, or two switches that
    cannot work together are both on (here, not in training/, so every module of a run can raise it)."""


def one_line(exc: BaseException) -> str:
    """The error's message on one line (what front ends print after ``prog: error:``)."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
