"""Pure label mappings that build the benchmark label maps users must prepare themselves (method.md §5.2, §5.3, P9).

Numpy in, numpy out; no files, no optional dependencies:

- :func:`coco_object_from_stuffthingmap`: raw COCO-Stuff map → COCO-Object 81-class labels (§5.3);
- :func:`coco_stuff_train_ids`: raw COCO-Stuff map → the 171 COCO-Stuff train ids;
- :func:`cityscapes_train_ids`: Cityscapes label ids → the 19 train ids;
- :func:`context_mapping` + :func:`context_from_459`: PASCAL-Context 459-class maps → 60-class labels
  (:func:`read_numbered_names_file` reads the 459 names).

The folder commands that apply them (``talk2dino convert``) are in `talk2dino.data.convert_folders`; painting raw
maps from COCO JSON annotations (pycocotools) is in `talk2dino.data.coco_masks`.

The "raw" COCO-Stuff maps (``stuffthingmaps_trainval2017.zip`` of the COCO-Stuff release) store, per pixel, the
COCO category id minus 1: things 1..90 give 0..89 (80 values occur), stuff 92..182 gives 91..181, 255 is unlabelled.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from talk2dino.data.benchmarks import class_lists
from talk2dino.errors import InvalidInputError, Talk2DinoError, one_line

__all__ = [
    "CITYSCAPES_LABEL_TO_TRAIN_ID",
    "COCO_STUFF_IDS",
    "COCO_THING_IDS",
    "CONTEXT_SOURCES_HELP",
    "UNLABELLED",
    "MissingDependencyError",
    "cityscapes_train_ids",
    "coco_object_from_stuffthingmap",
    "coco_stuff_train_ids",
    "context_from_459",
    "context_mapping",
    "read_numbered_names_file",
]

logger = logging.getLogger(__name__)

UNLABELLED: int = 255
"""Unlabelled / ignore value in raw COCO-Stuff maps and in every train-id map written here."""

COCO_THING_IDS: tuple[int, ...] = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83), *range(84, 91)
)
"""The 80 COCO thing category ids in ascending order (ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are unused)."""

COCO_STUFF_IDS: tuple[int, ...] = tuple(range(92, 183))
"""The 91 COCO-Stuff stuff category ids (183, 'other', marks thing pixels in the stuff JSON and is never used)."""

CITYSCAPES_LABEL_TO_TRAIN_ID: dict[int, int] = {
    7: 0,  # road
    8: 1,  # sidewalk
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    17: 5,  # pole
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}
"""The official Cityscapes labelId → trainId table (cityscapesScripts ``labels.py``); every other id → 255."""

CONTEXT_SOURCES_HELP: str = (
    "PASCAL-Context 59/60-class label maps are built from the official 459-class annotations: download "
    "trainval.tar.gz from https://cs.stanford.edu/~roozbeh/pascal-context/ and pass its trainval/ folder "
    "(<image id>.mat files with a LabelMap field; 16-bit <image id>.png index maps are accepted too) and its "
    "labels.txt (459 lines '<id>: <name>'), plus the VOC2010 folder (VOCdevkit/VOC2010, whose "
    "ImageSets/Main/val.txt gives the 5,105 val images). The alternative is mmsegmentation's PASCAL-Context "
    "converter, which needs trainval_merged.json and the Detail API"
)
"""What :func:`convert_context` needs; part of its error messages."""

_RAW_MAX = 255  # raw and id maps are 8-bit: lookup tables have 256 entries
_LUT_SIZE = _RAW_MAX + 1
_CITYSCAPES_LICENSE_PLATE_ID = -1  # the one negative Cityscapes id; ignored like every non-train class
# ASCII digits only, and at most 9 of them: int() of a 5,000-digit id raises ValueError (CPython's digit limit).
_NUMBERED_LINE = re.compile(r"^\s*([0-9]{1,9})(?:\s*:\s*|\s+)(.*?)\s*$")


class MissingDependencyError(Talk2DinoError, ImportError):
    """An optional dependency is not installed; the message says which extra provides it."""


# --------------------------------------------------------------------------------------------------------------
# Pure label mappings
# --------------------------------------------------------------------------------------------------------------


def _coco_object_table() -> np.ndarray:
    table = np.zeros(_LUT_SIZE, dtype=np.uint8)  # stuff, 255 and unused values are background (§5.3)
    for index, category_id in enumerate(COCO_THING_IDS):
        table[category_id - 1] = index + 1
    return table


def _coco_stuff_table() -> np.ndarray:
    table = np.full(_LUT_SIZE, UNLABELLED, dtype=np.uint8)
    for train_id, category_id in enumerate(COCO_THING_IDS + COCO_STUFF_IDS):
        table[category_id - 1] = train_id
    return table


def _cityscapes_table() -> np.ndarray:
    table = np.full(_LUT_SIZE, UNLABELLED, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_LABEL_TO_TRAIN_ID.items():
        table[label_id] = train_id
    return table


_COCO_OBJECT_TABLE = _coco_object_table()
_COCO_STUFF_TABLE = _coco_stuff_table()
_CITYSCAPES_TABLE = _cityscapes_table()
_COCO_RAW_KNOWN = np.zeros(_LUT_SIZE, dtype=bool)
_COCO_RAW_KNOWN[[category_id - 1 for category_id in COCO_THING_IDS + COCO_STUFF_IDS]] = True
_COCO_RAW_KNOWN[UNLABELLED] = True


def _as_index_array(values: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise InvalidInputError(f"{what} must be an [H, W] integer array; got shape {array.shape}, dtype {array.dtype}")
    return array


def _lookup(values: np.ndarray, table: np.ndarray, what: str) -> np.ndarray:
    """``table[values]`` for 8-bit values; anything outside [0, 255] is an error."""
    if values.size:
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > _RAW_MAX:
            raise InvalidInputError(f"{what} must hold values in [0, {_RAW_MAX}]; got values in [{low}, {high}]")
    return table[values]


def _warn_unknown_coco_values(raw: np.ndarray, *, mapped_to: str, source: str | None) -> None:
    counts = np.bincount(raw.ravel(), minlength=_LUT_SIZE)
    unknown = np.flatnonzero((counts > 0) & ~_COCO_RAW_KNOWN)
    if unknown.size:
        logger.warning(
            "%s: raw values %s are no COCO-Stuff category (id = value + 1); mapped to %s. Raw stuffthingmaps hold "
            "only 0-89 (80 things), 91-181 (stuff) and 255", source or "raw COCO-Stuff map", unknown.tolist(),
            mapped_to,
        )


def coco_object_from_stuffthingmap(raw: np.ndarray, *, source: str | None = None) -> np.ndarray:
    """Raw COCO-Stuff map → COCO-Object labels (method.md §5.3, P9).

    A thing with raw value r (category id r + 1) becomes 1 + its index among the 80 thing ids
    (:data:`COCO_THING_IDS`), so ``person`` = 1 … ``toothbrush`` = 80. Everything else is background 0: every stuff
    value (91..181), unlabelled 255, and values of no category (unused thing ids such as 11, i.e. id 12; these are
    logged). COCO-Object has no ignore label.

    Must be given the **raw** maps: ``*_labelTrainIds.png`` files hold other numbers and give wrong labels silently.

    Args:
        raw: ``[H, W]`` integer, raw values in [0, 255] (category id − 1; 255 unlabelled).
        source: Where the map comes from (a file name), for the log message about unknown values.

    Returns:
        ``[H, W]`` uint8 labels in [0, 80].

    Raises:
        InvalidInputError: Not a 2-D integer array, or values outside [0, 255].
    """
    values = _as_index_array(raw, "raw COCO-Stuff map")
    result = _lookup(values, _COCO_OBJECT_TABLE, "raw COCO-Stuff map")
    _warn_unknown_coco_values(values, mapped_to="background 0", source=source)
    return result


def coco_stuff_train_ids(raw: np.ndarray, *, source: str | None = None) -> np.ndarray:
    """Raw COCO-Stuff map → COCO-Stuff-171 train ids (the 182 → 171 mapping).

    The 171 categories that occur (80 things, then 91 stuff, each in ascending id order; Appendix A's
    COCO-Stuff-171 order) get train ids 0..170. Unlabelled 255 and values of no category stay / become 255
    (ignored; the latter are logged).

    Args:
        raw: ``[H, W]`` integer, raw values in [0, 255] (category id − 1; 255 unlabelled).
        source: Where the map comes from (a file name), for the log message about unknown values.

    Returns:
        ``[H, W]`` uint8 train ids in [0, 170] or 255.

    Raises:
        InvalidInputError: Not a 2-D integer array, or values outside [0, 255].
    """
    values = _as_index_array(raw, "raw COCO-Stuff map")
    result = _lookup(values, _COCO_STUFF_TABLE, "raw COCO-Stuff map")
    _warn_unknown_coco_values(values, mapped_to=f"ignore {UNLABELLED}", source=source)
    return result


def cityscapes_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Cityscapes label ids → the 19 train ids (:data:`CITYSCAPES_LABEL_TO_TRAIN_ID`); everything else → 255.

    The result equals cityscapesScripts' ``*_gtFine_labelTrainIds.png``: the official ``*_gtFine_labelIds.png``
    is rasterised from the same polygons, and the mapping is per pixel.

    Args:
        label_ids: ``[H, W]`` integer label ids in [0, 255] (−1, the licence plate id, is accepted → 255).

    Returns:
        ``[H, W]`` uint8 train ids in [0, 18] or 255.

    Raises:
        InvalidInputError: Not a 2-D integer array, or values outside [−1, 255].
    """
    values = _as_index_array(label_ids, "Cityscapes label-id map")
    if values.size and int(values.min()) == _CITYSCAPES_LICENSE_PLATE_ID:
        values = np.where(values == _CITYSCAPES_LICENSE_PLATE_ID, UNLABELLED, values)
    return _lookup(values, _CITYSCAPES_TABLE, "Cityscapes label-id map")


def read_numbered_names_file(path: str | os.PathLike[str]) -> dict[int, str]:
    """Read a PASCAL-Context names file such as ``labels.txt``: lines ``<id>: <name>`` (or ``<id> <name>``).

    Blank lines are skipped; names are stripped of surrounding spaces.

    Returns:
        id → name.

    Raises:
        InvalidInputError: Missing file, a malformed line or a repeated id (message names file and line).
    """
    file_path = Path(path)
    if not file_path.is_file():
        raise InvalidInputError(f"{file_path}: names file not found. {CONTEXT_SOURCES_HELP}")
    try:
        lines = file_path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{file_path}: cannot read names file ({one_line(exc)})") from exc
    names: dict[int, str] = {}
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        match = _NUMBERED_LINE.match(line)
        if match is None or not match.group(2):
            raise InvalidInputError(f"{file_path}:{line_number}: expected '<id>: <name>', got {one_line(repr(line))}")
        class_id = int(match.group(1))
        if class_id in names:
            raise InvalidInputError(f"{file_path}:{line_number}: id {class_id} appears twice")
        names[class_id] = match.group(2)
    if not names:
        raise InvalidInputError(f"{file_path}: names file is empty. {CONTEXT_SOURCES_HELP}")
    return names


def context_mapping(names459: Mapping[int, str], class_names: Sequence[str] | None = None) -> np.ndarray:
    """Lookup table from PASCAL-Context 459-class ids to 60-class labels, matching classes by name.

    Args:
        names459: id → name of the full annotation (``labels.txt``, see :func:`read_numbered_names_file`).
        class_names: The 59 non-background names in output label order (label = 1 + index); default: the
            Context-59 names of ``classes.json``, in mmsegmentation's label order (see ``benchmarks``).

    Returns:
        ``[max id + 1]`` uint8 table: the id of each of the 59 classes → its label 1..59, every other id
        (unlabelled 0 included) → 0, background.

    Raises:
        InvalidInputError: A class name is missing from ``names459`` or appears there twice.
    """
    wanted = tuple(class_lists()["context60"][1:]) if class_names is None else tuple(class_names)
    by_name: dict[str, list[int]] = {}
    for class_id, name in names459.items():
        by_name.setdefault(name, []).append(class_id)
    missing = [name for name in wanted if name not in by_name]
    if missing:
        raise InvalidInputError(
            f"the 459-class names file lacks {len(missing)} of the {len(wanted)} PASCAL-Context classes: {missing}; "
            "pass the labels.txt of the official trainval.tar.gz"
        )
    repeated = [name for name in wanted if len(by_name[name]) > 1]
    if repeated:
        raise InvalidInputError(f"the 459-class names file lists these classes under several ids: {repeated}")
    table = np.zeros(max(names459) + 1, dtype=np.uint8)
    for label, name in enumerate(wanted, start=1):
        table[by_name[name][0]] = label
    return table


def context_from_459(label459: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """A PASCAL-Context 459-class index map → 60-class labels (0 = background, 1..59 the classes).

    Args:
        label459: ``[H, W]`` integer ids of the full annotation (``LabelMap`` of the official ``.mat`` files).
        mapping: Table from :func:`context_mapping`.

    Returns:
        ``[H, W]`` uint8 labels in [0, 59].

    Raises:
        InvalidInputError: Not a 2-D integer array, or ids outside the table.
    """
    values = _as_index_array(label459, "PASCAL-Context 459-class map")
    if values.size:
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= mapping.shape[0]:
            raise InvalidInputError(
                f"PASCAL-Context 459-class map holds ids in [{low}, {high}], outside the names file's "
                f"[0, {mapping.shape[0] - 1}]"
            )
    return mapping[values]
