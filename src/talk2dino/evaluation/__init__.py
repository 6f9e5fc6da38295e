"""Evaluation: the mIoU metric (``metric``) and, above it, the benchmark runner (``runner``) and the result
records and reports it writes (``report``).

Needs the ``eval`` extra for dataset preparation (``pip install 'talk2dino[eval]'``). Nothing in the core
(``models``, ``ops``) imports this package, and ``import talk2dino`` does not load it (house-style §2).
"""

from talk2dino.data import FOLDER_LAYOUT_HELP

__all__ = ["DATASET_NAMES", "FOLDER_LAYOUT_HELP"]

# A light copy for `talk2dino eval --help` (the parser must not import numpy or torch); a test keeps it equal to
# `talk2dino.data.benchmarks.BENCHMARKS` + "folder".
DATASET_NAMES: tuple[str, ...] = (
    "voc20", "voc21", "context59", "context60", "coco_stuff", "coco_object", "cityscapes", "ade20k", "folder",
)
"""Every valid ``eval --dataset`` value."""
