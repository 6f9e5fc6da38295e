"""talk2dino: open-vocabulary semantic segmentation with Talk2DINO (arXiv 2411.19331).

The public surface is deliberately small (house-style §5). Heavy modules load on first use, so
``import talk2dino`` stays cheap and silent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "InferenceConfig",
    "ModelConfig",
    "SegmentationResult",
    "Segmenter",
    "__version__",
    "create_model",
    "list_models",
]

_LAZY = {
    "InferenceConfig": "talk2dino.config",
    "ModelConfig": "talk2dino.config",
    "SegmentationResult": "talk2dino.results",
    "Segmenter": "talk2dino.predictor",
    "create_model": "talk2dino.factory",
    "list_models": "talk2dino.catalog",  # names only: no torch
}

if TYPE_CHECKING:
    from talk2dino.catalog import list_models
    from talk2dino.config import InferenceConfig, ModelConfig
    from talk2dino.factory import create_model
    from talk2dino.predictor import Segmenter
    from talk2dino.results import SegmentationResult


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'talk2dino' has no attribute {name!r}")
