"""Segmenting image collections on Ray Data (issue 17; the optional extra ``talk2dino[ray]``).

- :func:`segment_dataset`: inputs (a folder, a glob, a list file, a Parquet/CSV table with an image-path column)
  -> decode + window cutting in CPU tasks -> an actor pool of `Segmenter`s (one model and one vocabulary
  embedding per actor) -> a Parquet dataset, one row per image (`talk2dino.scale.schema.OUTPUT_SCHEMA`).
  Resumable: a rerun skips images already in the output with the same size and modification time.
- :func:`run_segment_dataset`: the same, run to the end, returning a :class:`RunSummary` (the CLI's
  ``talk2dino segment-dataset``).

Nothing here imports Ray, pyarrow or torch until it is called, so ``import talk2dino`` stays light. See
docs/scale.md for clusters, throughput and the failure model.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OUTPUT_SCHEMA", "RunSummary", "init_ray", "require_ray", "run_segment_dataset", "segment_dataset"]


def require_ray() -> Any:
    """The ``ray`` module with Ray Data and pyarrow importable, or an ImportError naming the extra to install."""
    try:
        import pyarrow  # noqa: F401
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise ImportError(f"talk2dino.scale needs Ray Data ({err.name or err} is missing): "
                          "pip install 'talk2dino[ray]'") from err
    return ray

_LAZY = {
    "segment_dataset": "talk2dino.scale.pipeline",
    "run_segment_dataset": "talk2dino.scale.pipeline",
    "RunSummary": "talk2dino.scale.pipeline",
    "init_ray": "talk2dino.scale.pipeline",
    "OUTPUT_SCHEMA": "talk2dino.scale.schema",
}


def __getattr__(name: str) -> Any:
    """Import the pipeline (and Ray, pyarrow) on first use of one of its names."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'talk2dino.scale' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
