"""One clear message per failure, naming the node and the input at fault."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from firered_core.errors import FireRedError
from firered_core.validation import check


class NodeInputError(FireRedError):
    """A node input is missing, malformed or inconsistent; the message says which and how to fix it."""


def input_error(node: str, input_name: str, message: str) -> NodeInputError:
    return NodeInputError(f"{node}: input '{input_name}': {message}")


def check_inputs(node: str, values: dict[str, Any], limits: dict[str, str] | None = None) -> None:
    """Check numeric inputs against :data:`firered_core.validation.LIMITS` (``limits`` maps an input to its entry
    when the names differ); the error names the node and the input."""
    check(values, spell=lambda name: f"{node}: input '{name}':", limits=limits)


@contextlib.contextmanager
def blame(node: str, input_name: str, *errors: type[BaseException]) -> Iterator[None]:
    """Re-raise ``errors`` (ValueError by default) from the block as a :class:`NodeInputError` on ``input_name``."""
    try:
        yield
    except NodeInputError:
        raise
    except errors or (ValueError,) as exc:
        raise input_error(node, input_name, str(exc)) from exc
