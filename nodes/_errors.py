"""One clear message per failure, naming the node and the input at fault."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

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


def look_up(node: str, input_name: str, find: Callable[[str], Path | None], name: str,
            missing: Callable[[str], str]) -> Path:
    """``find(name)`` for a loader input (which refuses names leaving the model folders: firered_core.paths), blamed
    on the input; ``missing(name)`` says what to install where when nothing is found."""
    with blame(node, input_name):
        path = find(name)
    if path is None:
        raise input_error(node, input_name, missing(name))
    return path


def validate_names(node: str, inputs: Mapping[str, tuple[Callable[[str], Path | None], str, Callable[[str], str]]],
                   ) -> bool | str:
    """``VALIDATE_INPUTS`` for loader inputs (input -> (find, name, missing)): True, or every problem in one line.
    It replaces ComfyUI's own list check, so it must refuse what :func:`look_up` refuses when the node runs."""
    problems = []
    for input_name, (find, name, missing) in inputs.items():
        try:
            look_up(node, input_name, find, name, missing)
        except FireRedError as exc:
            problems.append(str(exc))
    return " ".join(problems) or True


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
