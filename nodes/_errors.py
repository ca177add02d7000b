"""One clear message per failure, naming the node and the input at fault."""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Mapping

from firered_core.errors import FireRedError
from firered_core.limits import check


class NodeInputError(FireRedError):
    """A node input is missing, malformed or inconsistent; the message says which and how to fix it."""


def input_error(node: str, input_name: str, message: str) -> NodeInputError:
    return NodeInputError(f"{node}: input '{input_name}': {message}", field=input_name)


def check_inputs(node: str, values: dict[str, Any], limits: dict[str, str] | None = None,
                 table: dict | None = None) -> None:
    """Check numeric inputs against :data:`firered_core.limits.LIMITS` (``limits`` maps an input to its entry
    when the names differ; ``table`` replaces LIMITS, e.g. the speed options'); the error names the node and the
    input."""
    check(values, spell=lambda name: f"{node}: input '{name}':", limits=limits, table=table)


@contextlib.contextmanager
def blame(node: str, input_name: str, *errors: type[BaseException], inputs: Iterable[str] = (),
          aliases: Mapping[str, str] | None = None) -> Iterator[None]:
    """Re-raise ``errors`` (:class:`FireRedError` by default) from the block as a :class:`NodeInputError`.

    The input blamed is the one the error names (its ``field``) when that is one of ``inputs`` (the node's inputs
    whose values went into the block under their own names) or a key of ``aliases`` (a library field -> the node
    input it came from, e.g. ``{"prompt": "positive"}``), else ``input_name``.
    """
    names = {**{name: name for name in inputs}, **(aliases or {})}
    try:
        yield
    except NodeInputError:
        raise
    except errors or (FireRedError,) as exc:
        raise input_error(node, names.get(getattr(exc, "field", None), input_name), str(exc)) from exc
