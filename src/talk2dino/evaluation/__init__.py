"""Evaluation: the mIoU metric (``metric``) and, above it, the benchmark runner and result records.

Needs the ``eval`` extra for dataset preparation (``pip install 'talk2dino[eval]'``). Nothing in the core
(``models``, ``ops``) imports this package, and ``import talk2dino`` does not load it (house-style §2).
"""

# Light copies for `talk2dino eval --help` (the parser must not import numpy or torch); a test keeps them equal to
# `talk2dino.data.benchmarks.BENCHMARKS` + "folder" and `FOLDER_LAYOUT_HELP`.
DATASET_NAMES: tuple[str, ...] = (
    "voc20", "voc21", "context59", "context60", "coco_stuff", "coco_object", "cityscapes", "ade20k", "folder",
)
"""Every valid ``eval --dataset`` value."""

FOLDER_LAYOUT_HELP = (
    "a `folder` dataset is ROOT/images/<name>.jpg|.jpeg|.png with ROOT/labels/<name>.png (single-channel PNG "
    "whose pixel values are class indices, 255 = ignore), plus a classes file with one class name per line in "
    "label order (--classes-file)"
)
