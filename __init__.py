"""ComfyUI entry point of the FireRed-Image-Edit node pack (``custom_nodes/<this folder>``).

``firered_core`` is imported by name: installed with pip, or found next to this file.
"""

import importlib.util
import os
import sys

if importlib.util.find_spec("firered_core") is None:
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
