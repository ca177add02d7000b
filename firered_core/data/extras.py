"""Optional packages of the data tools (the ``data`` extra): one clear message when one is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import FireRedError

EXTRA_HINT = "pip install 'comfyui-firered-edit[data]'"

# module name -> (pip package, what needs it)
PACKAGES = {
    "imagehash": "imagehash",
    "faiss": "faiss-cpu",
    "cv2": "opencv-python-headless",
    "ray": "ray[data]",
    "timm": "timm",
    "open_clip": "open_clip_torch",
}


class DataToolError(FireRedError):
    """Bad data-tool input: a config key, a row file, an output folder."""


class MissingExtra(DataToolError):
    """An optional package a configured descriptor or engine needs is not installed."""


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtra` naming the package, what needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = PACKAGES.get(module, module)
        raise MissingExtra(f"{purpose} needs the '{package}' package, which is not installed: "
                           f"pip install {package} (or {EXTRA_HINT})") from None


def available(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
