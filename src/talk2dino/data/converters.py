"""Converters that build the benchmark label maps users must prepare themselves (method.md §5.2, §5.3, P9).

Pure functions (numpy in, numpy out; no files, no optional dependencies):

- :func:`coco_object_from_stuffthingmap`: raw COCO-Stuff map → COCO-Object 81-class labels (§5.3);
- :func:`coco_stuff_train_ids`: raw COCO-Stuff map → the 171 COCO-Stuff train ids;
- :func:`cityscapes_train_ids`: Cityscapes label ids → the 19 train ids;
- :func:`context_mapping` + :func:`context_from_459`: PASCAL-Context 459-class maps → 60-class labels.

Commands (folders in, PNG files out; every file written atomically, existing outputs skipped unless
``overwrite=True`` so an interrupted run resumes; each returns :class:`ConversionCounts`):

- :func:`convert_coco_object`, :func:`convert_coco_stuff`: raw ``stuffthingmaps`` PNGs → ``*_instanceTrainIds.png``
  / ``*_labelTrainIds.png``, the names §5.2 expects;
- :func:`convert_cityscapes`: ``*_gtFine_labelIds.png`` → ``*_gtFine_labelTrainIds.png`` next to them;
- :func:`convert_context`: the official 459-class PASCAL-Context annotations → ``SegmentationClassContext/`` and
  ``ImageSets/SegmentationContext/val.txt``;
- :func:`write_stuffthingmaps` (needs ``pycocotools``): COCO instance / stuff JSONs → raw stuffthingmaps, for
  users who have the JSON annotations but not the PNG maps.

The "raw" COCO-Stuff maps (``stuffthingmaps_trainval2017.zip`` of the COCO-Stuff release) store, per pixel, the
COCO category id minus 1: things 1..90 give 0..89 (80 values occur), stuff 92..182 gives 91..181, 255 is unlabelled.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

from talk2dino.data.benchmarks import class_lists, read_label_png
from talk2dino.errors import InvalidInputError, Talk2DinoError, one_line
from talk2dino.fileio import JSON_READ_ERRORS
from talk2dino.outputs import atomic_path

__all__ = [
    "CITYSCAPES_LABEL_TO_TRAIN_ID",
    "COCO_STUFF_IDS",
    "COCO_THING_IDS",
    "CONTEXT_SOURCES_HELP",
    "UNLABELLED",
    "CocoStuffThingPainter",
    "ConversionCounts",
    "MissingDependencyError",
    "cityscapes_train_ids",
    "coco_masks_to_stuffthingmap",
    "coco_object_from_stuffthingmap",
    "coco_stuff_train_ids",
    "context_from_459",
    "context_mapping",
    "convert_cityscapes",
    "convert_coco_object",
    "convert_coco_stuff",
    "convert_context",
    "read_numbered_names_file",
    "write_stuffthingmaps",
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
_COCO_OTHER_ID = 183  # COCO-Stuff's 'other' (= thing pixels) in stuff_*.json; painted by the instance JSON instead
_CONVERTED_SUFFIXES = ("_labelTrainIds.png", "_instanceTrainIds.png")
_CITYSCAPES_IDS_SUFFIX = "_gtFine_labelIds.png"
_CITYSCAPES_TRAIN_SUFFIX = "_gtFine_labelTrainIds.png"
_COCO_OBJECT_SUFFIX = "_instanceTrainIds.png"
_COCO_STUFF_SUFFIX = "_labelTrainIds.png"
_CONTEXT_ANN_DIR = "SegmentationClassContext"
_CONTEXT_SPLIT = "ImageSets/SegmentationContext/val.txt"
_VOC_MAIN_VAL = "ImageSets/Main/val.txt"
_CONTEXT_MAT_FIELD = "LabelMap"
# ASCII digits only, and at most 9 of them: int() of a 5,000-digit id raises ValueError (CPython's digit limit).
_NUMBERED_LINE = re.compile(r"^\s*([0-9]{1,9})(?:\s*:\s*|\s+)(.*?)\s*$")


class MissingDependencyError(Talk2DinoError, ImportError):
    """An optional dependency is not installed; the message says which extra provides it."""


@dataclass(frozen=True)
class ConversionCounts:
    """What a converter command did."""

    written: int  # output files written
    skipped: int  # outputs that already existed and were kept (overwrite=False)

    def describe(self) -> str:
        """One sentence for people, e.g. ``wrote 118 label maps; kept 2 that already existed (--overwrite ...)``."""
        text = f"wrote {self.written} label map{'' if self.written == 1 else 's'}"
        if self.skipped:
            text += (f"; kept {self.skipped} that already existed (pass --overwrite to rewrite "
                     f"{'it' if self.skipped == 1 else 'them'})")
        return text


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


# --------------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------------


def _require_dir(path: Path, what: str, help_text: str = "") -> None:
    if not path.is_dir():
        raise InvalidInputError(f"{path}: {what} not found" + (f"; {help_text}" if help_text else ""))


def _names_file(path: Path, error: InvalidInputError) -> bool:
    return str(error).startswith(str(path))


def _write_png(path: Path, labels: np.ndarray) -> None:
    """Write 8-bit single-channel ("L") label values, atomically."""
    with atomic_path(path) as temporary:
        Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8)).save(temporary, format="PNG")


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _raw_stuffthingmaps(folder: Path) -> list[Path]:
    _require_dir(
        folder, "stuffthingmaps folder",
        "unzip stuffthingmaps_trainval2017.zip of the COCO-Stuff release (e.g. into coco_stuff164k/annotations/) "
        "and pass its val2017/ folder",
    )
    pngs = sorted(path for path in folder.glob("*.png") if not _is_hidden(path))
    raw = [path for path in pngs if not path.name.endswith(_CONVERTED_SUFFIXES)]
    if not raw:
        converted = " (it holds only converted *_labelTrainIds.png / *_instanceTrainIds.png maps)" if pngs else ""
        raise InvalidInputError(
            f"{folder}: no raw stuffthingmaps PNGs (<image id>.png, values = COCO category id - 1){converted}; "
            "they come from stuffthingmaps_trainval2017.zip of the COCO-Stuff release (or write_stuffthingmaps "
            "from the COCO JSONs)"
        )
    return raw


def _convert_stuffthingmaps(
    stuffthingmaps_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None,
    *,
    suffix: str,
    convert: Callable[..., np.ndarray],
    overwrite: bool,
) -> ConversionCounts:
    source = Path(stuffthingmaps_dir)
    inputs = _raw_stuffthingmaps(source)
    target = source if out_dir is None else Path(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    for path in inputs:
        output = target / f"{path.stem}{suffix}"
        if output.exists() and not overwrite:
            skipped += 1
            continue
        raw = read_label_png(path)
        try:
            labels = convert(raw, source=str(path))
        except InvalidInputError as exc:
            if _names_file(path, exc):
                raise
            raise InvalidInputError(f"{path}: {exc}") from exc
        _write_png(output, labels)
        written += 1
    logger.info("%s: wrote %d %s maps to %s, kept %d existing", source, written, suffix, target, skipped)
    return ConversionCounts(written=written, skipped=skipped)


def convert_coco_object(
    stuffthingmaps_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
) -> ConversionCounts:
    """Build COCO-Object label maps ``<id>_instanceTrainIds.png`` from raw stuffthingmaps (method.md §5.3).

    Unlike the reference's converter this works on any subset (val2017 alone is enough) and refuses converted
    maps: files ending in ``_labelTrainIds.png`` / ``_instanceTrainIds.png`` are never read as raw maps.

    Args:
        stuffthingmaps_dir: Folder of raw maps ``<image id>.png`` (e.g. ``coco_stuff164k/annotations/val2017``,
            where mmsegmentation's layout unzips them).
        out_dir: Output folder (created if needed); default: ``stuffthingmaps_dir`` itself, which is where
            method.md §5.2 expects the maps.
        overwrite: Rewrite outputs that already exist.

    Returns:
        Counts of written and skipped files.

    Raises:
        InvalidInputError: Missing folder, no raw maps, or an unreadable / out-of-range map (named).
    """
    return _convert_stuffthingmaps(stuffthingmaps_dir, out_dir, suffix=_COCO_OBJECT_SUFFIX,
                                   convert=coco_object_from_stuffthingmap, overwrite=overwrite)


def convert_coco_stuff(
    stuffthingmaps_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
) -> ConversionCounts:
    """Build COCO-Stuff-171 label maps ``<id>_labelTrainIds.png`` from raw stuffthingmaps (method.md §5.2).

    Same arguments, return value and errors as :func:`convert_coco_object`; the mapping is
    :func:`coco_stuff_train_ids`.
    """
    return _convert_stuffthingmaps(stuffthingmaps_dir, out_dir, suffix=_COCO_STUFF_SUFFIX,
                                   convert=coco_stuff_train_ids, overwrite=overwrite)


def convert_cityscapes(gtfine_dir: str | os.PathLike[str], *, overwrite: bool = False) -> ConversionCounts:
    """Write ``*_gtFine_labelTrainIds.png`` next to every ``*_gtFine_labelIds.png`` under ``gtfine_dir``.

    Args:
        gtfine_dir: ``cityscapes/gtFine`` or one of its split folders; searched recursively.
        overwrite: Rewrite outputs that already exist.

    Returns:
        Counts of written and skipped files.

    Raises:
        InvalidInputError: Missing folder, no ``*_gtFine_labelIds.png`` file, or an unreadable map (named).
    """
    root = Path(gtfine_dir)
    _require_dir(root, "Cityscapes gtFine folder", "unzip gtFine_trainvaltest.zip and pass cityscapes/gtFine")
    inputs = sorted(path for path in root.rglob(f"*{_CITYSCAPES_IDS_SUFFIX}") if not _is_hidden(path))
    if not inputs:
        raise InvalidInputError(
            f"{root}: no *{_CITYSCAPES_IDS_SUFFIX} files; pass the gtFine folder of gtFine_trainvaltest.zip"
        )
    written = skipped = 0
    for path in inputs:
        output = path.with_name(path.name[: -len(_CITYSCAPES_IDS_SUFFIX)] + _CITYSCAPES_TRAIN_SUFFIX)
        if output.exists() and not overwrite:
            skipped += 1
            continue
        try:
            labels = cityscapes_train_ids(read_label_png(path))
        except InvalidInputError as exc:
            if _names_file(path, exc):
                raise
            raise InvalidInputError(f"{path}: {exc}") from exc
        _write_png(output, labels)
        written += 1
    logger.info("%s: wrote %d train-id maps, kept %d existing", root, written, skipped)
    return ConversionCounts(written=written, skipped=skipped)


def _read_459_map(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".png":
        return read_label_png(path)
    try:
        from scipy.io import loadmat
    except ImportError as exc:
        raise MissingDependencyError(
            "reading PASCAL-Context .mat annotations needs scipy: pip install 'talk2dino[eval]' (or pip install scipy)"
        ) from exc
    try:
        content = loadmat(str(path))
    except (OSError, ValueError, TypeError, NotImplementedError) as exc:
        raise InvalidInputError(f"{path}: cannot read .mat file ({exc})") from exc
    if _CONTEXT_MAT_FIELD not in content:
        raise InvalidInputError(f"{path}: no {_CONTEXT_MAT_FIELD} field; expected an official PASCAL-Context .mat")
    return np.asarray(content[_CONTEXT_MAT_FIELD]).astype(np.int64)


def convert_context(
    annotations_dir: str | os.PathLike[str],
    labels_file: str | os.PathLike[str],
    voc2010_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> ConversionCounts:
    """Build PASCAL-Context 60-class maps from the official 459-class annotations (method.md §5.2).

    Writes ``<voc2010_dir>/SegmentationClassContext/<image id>.png`` (0 = background, 1..59 in the label order
    of ``classes.json``, classes matched to ``labels.txt`` by name) and, when ``ImageSets/Main/val.txt`` exists,
    ``ImageSets/SegmentationContext/val.txt`` with its images that have a map (kept if present, unless
    ``overwrite``). Context-59 reads the same maps with ``reduce_zero_label``.

    What is needed (also in every "not found" error): :data:`CONTEXT_SOURCES_HELP`.

    Args:
        annotations_dir: The ``trainval/`` folder of the official ``trainval.tar.gz``: ``<image id>.mat`` files
            (needs scipy) or 16-bit ``<image id>.png`` index maps.
        labels_file: Its ``labels.txt`` (``<id>: <name>``, 459 classes).
        voc2010_dir: ``VOCdevkit/VOC2010``.
        overwrite: Rewrite outputs that already exist.

    Returns:
        Counts of written and skipped label maps.

    Raises:
        InvalidInputError: Missing inputs (the message says exactly which files are needed), a names file that
            lacks a class, or an unreadable map.
        MissingDependencyError: ``.mat`` inputs without scipy.
    """
    source = Path(annotations_dir)
    voc2010 = Path(voc2010_dir)
    _require_dir(source, "PASCAL-Context 459-class annotation folder", CONTEXT_SOURCES_HELP)
    _require_dir(voc2010, "VOC2010 folder", CONTEXT_SOURCES_HELP)
    mapping = context_mapping(read_numbered_names_file(labels_file))
    inputs = sorted(
        path for path in source.iterdir()
        if path.suffix.lower() in (".mat", ".png") and not _is_hidden(path) and path.is_file()
    )
    if not inputs:
        raise InvalidInputError(f"{source}: no .mat (or .png) annotation files; {CONTEXT_SOURCES_HELP}")
    stems = [path.stem for path in inputs]
    if len(set(stems)) != len(stems):
        raise InvalidInputError(f"{source}: some image ids have both a .mat and a .png file; keep one of each")
    target = voc2010 / _CONTEXT_ANN_DIR
    target.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    for path in inputs:
        output = target / f"{path.stem}.png"
        if output.exists() and not overwrite:
            skipped += 1
            continue
        try:
            labels = context_from_459(_read_459_map(path), mapping)
        except InvalidInputError as exc:
            if _names_file(path, exc):
                raise
            raise InvalidInputError(f"{path}: {exc}") from exc
        _write_png(output, labels)
        written += 1
    _write_context_split(voc2010, set(stems), overwrite=overwrite)
    logger.info("%s: wrote %d PASCAL-Context maps to %s, kept %d existing", source, written, target, skipped)
    return ConversionCounts(written=written, skipped=skipped)


def _write_context_split(voc2010: Path, available: set[str], *, overwrite: bool) -> None:
    split = voc2010 / _CONTEXT_SPLIT
    if split.exists() and not overwrite:
        return
    main_val = voc2010 / _VOC_MAIN_VAL
    if not main_val.is_file():
        logger.warning("%s not found, so %s was not written; the Context benchmarks need it", main_val, split)
        return
    stems = [line.strip() for line in main_val.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [stem for stem in stems if stem in available]
    if len(kept) < len(stems):
        logger.warning("%d of the %d VOC2010 val images have no PASCAL-Context map; %s lists the other %d",
                       len(stems) - len(kept), len(stems), split, len(kept))
    split.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(split) as temporary:
        temporary.write_text("".join(f"{stem}\n" for stem in kept), encoding="utf-8")


# --------------------------------------------------------------------------------------------------------------
# COCO JSON masks (pycocotools)
# --------------------------------------------------------------------------------------------------------------


def _mask_api() -> Any:
    try:
        from pycocotools import mask as mask_api
    except ImportError as exc:
        raise MissingDependencyError(
            "decoding COCO polygon / RLE masks needs pycocotools: pip install 'talk2dino[eval]'"
        ) from exc
    return mask_api


CocoSource = Union[str, "os.PathLike[str]", Mapping[str, Any]]  # noqa: UP007 (a runtime alias on Python 3.10)


class CocoStuffThingPainter:
    """Raw stuffthingmaps from COCO-format JSON annotations (instances and / or stuff), using pycocotools.

    For users who have ``instances_val2017.json`` and ``stuff_val2017.json`` but not the stuffthingmaps PNGs.
    The JSONs are read and indexed once; :meth:`paint` then renders one image.

    Painting: every annotation (crowd ones included) paints its ``category_id − 1`` over its mask, in the order
    of the sources and then of the annotations in each, so **later annotations win where masks overlap**. Pass
    the stuff JSON before the instances JSON so that things are painted over stuff. Annotations of COCO-Stuff's
    ``other`` category (id 183, which marks thing pixels in the stuff JSON) and of ids outside 1..182 are skipped
    (logged). Pixels that no annotation covers are 255 (unlabelled).

    Panoptic JSONs hold no masks (their segments are PNGs) and are not supported.
    """

    def __init__(self, sources: CocoSource | Sequence[CocoSource]) -> None:
        """Args:
            sources: One COCO JSON (a path or an already loaded dict) or a sequence of them, painted in order.

        Raises:
            InvalidInputError: A missing or malformed JSON.
            MissingDependencyError: pycocotools is not installed.
        """
        self._mask_api = _mask_api()
        source_list: list[CocoSource]
        if isinstance(sources, (str, os.PathLike, Mapping)):
            source_list = [sources]
        else:
            source_list = list(sources)
        self._sizes: dict[int, tuple[int, int]] = {}
        self._file_names: dict[int, str] = {}
        self._annotations: dict[int, list[dict[str, Any]]] = {}
        for source in source_list:
            self._add(source)

    def _add(self, source: CocoSource) -> None:
        if isinstance(source, Mapping):
            data, where = source, "COCO dict"
        else:
            path = Path(source)
            if not path.is_file():
                raise InvalidInputError(f"{path}: COCO JSON not found")
            from talk2dino.fileio import json_loads_unique

            try:
                # A repeated key (a real "annotations" list, then an empty one) must not read as an empty file.
                data = json_loads_unique(path.read_bytes())
            except JSON_READ_ERRORS as exc:
                raise InvalidInputError(f"{one_line(path)}: cannot read COCO JSON ({one_line(exc)})") from exc
            where = one_line(path)
        if not isinstance(data, Mapping) or not isinstance(data.get("annotations"), list):
            raise InvalidInputError(f"{where}: not a COCO annotation file (no 'annotations' list)")
        images = data.get("images", [])
        if not isinstance(images, list):
            raise InvalidInputError(f"{where}: 'images' is a JSON {type(images).__name__}, expected a list")
        from talk2dino.data.images import MAX_IMAGE_PIXELS

        for index, image in enumerate(images):
            try:
                image_id, size = _json_int(image["id"]), (_json_int(image["height"]), _json_int(image["width"]))
            except (KeyError, TypeError, ValueError, OverflowError) as exc:
                raise InvalidInputError(
                    f"{where}: images[{index}] lacks an integer id/height/width: {one_line(repr(image))}"
                ) from exc
            if size[0] < 1 or size[1] < 1 or size[0] * size[1] > MAX_IMAGE_PIXELS:
                # paint() allocates height x width; refuse sizes that cannot be a real image.
                raise InvalidInputError(
                    f"{where}: images[{index}] (id {image_id}) has size {size[1]}x{size[0]}; expected 1 to "
                    f"{MAX_IMAGE_PIXELS:,} pixels"
                )
            if image_id in self._sizes and self._sizes[image_id] != size:
                raise InvalidInputError(f"{where}: image {image_id} has size {size}, elsewhere {self._sizes[image_id]}")
            self._sizes[image_id] = size
            if "file_name" in image:
                self._file_names[image_id] = str(image["file_name"])
        for index, annotation in enumerate(data["annotations"]):
            needed = {"image_id", "segmentation", "category_id"}
            if not isinstance(annotation, Mapping) or not needed <= set(annotation):
                raise InvalidInputError(
                    f"{where}: annotations[{index}] is not an object with image_id/category_id/segmentation"
                )
            try:
                image_id, _ = _json_int(annotation["image_id"]), _json_int(annotation["category_id"])
            except (TypeError, ValueError, OverflowError) as exc:
                raise InvalidInputError(
                    f"{where}: annotations[{index}] has a non-integer image_id or category_id: "
                    f"{one_line(repr(annotation))}"
                ) from exc
            self._annotations.setdefault(image_id, []).append(dict(annotation))

    @property
    def image_ids(self) -> list[int]:
        """Ids of the images listed in the JSONs' ``images`` sections, sorted."""
        return sorted(self._sizes)

    def file_name(self, image_id: int) -> str | None:
        """The image's ``file_name`` in the JSON, if given."""
        return self._file_names.get(image_id)

    def paint(self, image_id: int, height: int | None = None, width: int | None = None) -> np.ndarray:
        """Render one image's raw stuffthingmap.

        Args:
            image_id: COCO image id.
            height: Image height; default from the JSON's ``images`` entry (must agree when both are given).
            width: Image width; likewise.

        Returns:
            ``[H, W]`` uint8 raw values: category id − 1, or 255 where no annotation paints.

        Raises:
            InvalidInputError: Unknown size, conflicting sizes, or a malformed segmentation.
        """
        known = self._sizes.get(int(image_id))
        if height is None or width is None:
            if known is None:
                raise InvalidInputError(f"image {image_id} is not in the JSON's images; pass height and width")
            height, width = known
        elif known is not None and known != (height, width):
            raise InvalidInputError(f"image {image_id} is {known[1]}x{known[0]} in the JSON, not {width}x{height}")
        canvas = np.full((height, width), UNLABELLED, dtype=np.uint8)
        for annotation in self._annotations.get(int(image_id), []):
            category_id = int(annotation["category_id"])
            if not 1 <= category_id < _COCO_OTHER_ID:
                logger.debug("image %s: skipping annotation of category %d", image_id, category_id)
                continue
            mask = self._decode(annotation["segmentation"], height, width, image_id)
            canvas[mask] = category_id - 1
        return canvas

    def _decode(self, segmentation: Any, height: int, width: int, image_id: int) -> np.ndarray:
        api = self._mask_api
        try:
            if isinstance(segmentation, list):  # polygons: [[x1, y1, x2, y2, ...], ...]
                if not segmentation:
                    return np.zeros((height, width), dtype=bool)
                rle = api.merge(api.frPyObjects(segmentation, height, width))
            elif isinstance(segmentation, Mapping) and isinstance(segmentation.get("counts"), list):
                rle = api.frPyObjects(dict(segmentation), height, width)  # uncompressed RLE
            elif isinstance(segmentation, Mapping):
                rle = dict(segmentation)  # compressed RLE
            else:
                raise TypeError(f"unsupported segmentation of type {type(segmentation).__name__}")
            if [int(side) for side in rle["size"]] != [height, width]:
                raise ValueError(f"mask size {rle['size']} differs from the image's {[height, width]}")
            return np.asarray(api.decode(rle), dtype=bool)
        except Exception as exc:  # pycocotools raises bare Exception (and TypeError, ...) on malformed input
            raise InvalidInputError(f"image {image_id}: bad segmentation ({exc})") from exc


def _json_int(value: Any) -> int:
    """An integer JSON value (``12`` or ``12.0``); TypeError/ValueError for anything else (bools, strings, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    if isinstance(value, float) and not value.is_integer():  # also False for NaN and infinities
        raise ValueError(f"expected an integer, got {value}")
    return int(value)


def coco_masks_to_stuffthingmap(
    coco: CocoSource | Sequence[CocoSource], image_id: int, height: int | None = None, width: int | None = None
) -> np.ndarray:
    """One image's raw stuffthingmap from COCO-format JSON annotations (polygons and RLE), via pycocotools.

    A one-shot wrapper of :class:`CocoStuffThingPainter` (see it for the painting and overlap rules); for many
    images build the painter once, or use :func:`write_stuffthingmaps`.

    Args:
        coco: A COCO JSON path or loaded dict, or a sequence of them (stuff before instances).
        image_id: COCO image id.
        height: Image height; default from the JSON.
        width: Image width; default from the JSON.

    Returns:
        ``[H, W]`` uint8 raw values (category id − 1; 255 unlabelled), ready for
        :func:`coco_object_from_stuffthingmap` or :func:`coco_stuff_train_ids`.

    Raises:
        MissingDependencyError: pycocotools is not installed (``pip install 'talk2dino[eval]'``).
        InvalidInputError: Malformed JSON or segmentation, or unknown image size.
    """
    return CocoStuffThingPainter(coco).paint(image_id, height, width)


def write_stuffthingmaps(
    sources: CocoSource | Sequence[CocoSource],
    out_dir: str | os.PathLike[str],
    *,
    image_ids: Iterable[int] | None = None,
    overwrite: bool = False,
) -> ConversionCounts:
    """Write raw stuffthingmaps ``<file stem>.png`` for the images of COCO JSONs (then run the converters).

    Args:
        sources: COCO JSON paths or dicts, painted in order (stuff before instances; see
            :class:`CocoStuffThingPainter`).
        out_dir: Output folder, created if needed (e.g. ``coco_stuff164k/annotations/val2017``).
        image_ids: Images to render; default: every image of the JSONs' ``images`` sections.
        overwrite: Rewrite outputs that already exist.

    Returns:
        Counts of written and skipped files.

    Raises:
        MissingDependencyError: pycocotools is not installed.
        InvalidInputError: Malformed JSON or no image to render.
    """
    painter = CocoStuffThingPainter(sources)
    wanted = painter.image_ids if image_ids is None else [int(image_id) for image_id in image_ids]
    if not wanted:
        raise InvalidInputError("the COCO JSONs list no images to render")
    target = Path(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    for image_id in wanted:
        file_name = painter.file_name(image_id)
        stem = Path(file_name).stem if file_name else f"{image_id:012d}"
        output = target / f"{stem}.png"
        if output.exists() and not overwrite:
            skipped += 1
            continue
        _write_png(output, painter.paint(image_id))
        written += 1
    logger.info("wrote %d raw stuffthingmaps to %s, kept %d existing", written, target, skipped)
    return ConversionCounts(written=written, skipped=skipped)
