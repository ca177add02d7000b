"""One clear message per failure, naming the node and the input at fault."""

from __future__ import annotations

import contextlib
from typing import Iterator


class NodeInputError(ValueError):
    """A node input is missing, malformed or inconsistent; the message says which and how to fix it."""


def input_error(node: str, input_name: str, message: str) -> NodeInputError:
    return NodeInputError(f"{node}: input '{input_name}': {message}")


@contextlib.contextmanager
def blame(node: str, input_name: str, *errors: type[BaseException]) -> Iterator[None]:
    """Re-raise ``errors`` (ValueError by default) from the block as a :class:`NodeInputError` on ``input_name``."""
    try:
        yield
    except NodeInputError:
        raise
    except errors or (ValueError,) as exc:
        raise input_error(node, input_name, str(exc)) from exc
