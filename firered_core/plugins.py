"""The one plug-in importer: ``package.module:name`` to the object it names.

Face embedders and detectors (:mod:`firered_core.training.faces`), reward functions and OCR engines
(:mod:`firered_core.rewards`) are all named this way in a config; each caller passes the error class of its domain so
the user's message names the config key at fault and the run exits 2.
"""

from __future__ import annotations

import importlib

from .errors import FireRedError


def import_object(spec: str, what: str, error: type[FireRedError] = FireRedError) -> object:
    """The object named ``package.module:attribute``; ``error`` naming ``what`` (the config key) and ``spec`` when
    ``spec`` has no colon or the module or attribute cannot be imported."""
    if ":" not in spec:
        raise error(f"{what} {spec!r} is not 'package.module:name'")
    module, attr = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise error(f"{what} {spec!r}: cannot import ({exc})") from None
