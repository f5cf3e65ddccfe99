"""faceid: identity-preserving image generation with IP-Adapter-FaceID.

The main entry points are imported lazily, so ``import faceid`` stays cheap (no torch/diffusers import
until they are used).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["ControlInput", "FaceAnalyzer", "FaceIDAdapter", "FaceIDPipeline", "Reference", "__version__"]

_LAZY = {
    "FaceIDPipeline": "faceid.pipeline",
    "FaceIDAdapter": "faceid.adapter",
    "FaceAnalyzer": "faceid.faces",
    "ControlInput": "faceid.modes",
    "Reference": "faceid.groups",
}

if TYPE_CHECKING:  # pragma: no cover
    from .adapter import FaceIDAdapter
    from .faces import FaceAnalyzer
    from .groups import Reference
    from .modes import ControlInput
    from .pipeline import FaceIDPipeline


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'faceid' has no attribute {name!r}")
