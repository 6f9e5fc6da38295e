"""Folder commands of ``talk2dino convert``: benchmark label maps from the files users download (method.md §5.2).

Folders in, PNG files out; every file written atomically, existing outputs skipped unless ``overwrite=True`` so an
interrupted run resumes; each returns :class:`ConversionCounts`. The per-pixel mappings are the pure functions of
`talk2dino.data.converters`.

- :func:`convert_coco_object`, :func:`convert_coco_stuff`: raw ``stuffthingmaps`` PNGs → ``*_instanceTrainIds.png``
  / ``*_labelTrainIds.png``, the names §5.2 expects;
- :func:`convert_cityscapes`: ``*_gtFine_labelIds.png`` → ``*_gtFine_labelTrainIds.png`` next to them;
- :func:`convert_context`: the official 459-class PASCAL-Context annotations → ``SegmentationClassContext/`` and
  ``ImageSets/SegmentationContext/val.txt``.

Raw stuffthingmaps from COCO JSON annotations: `talk2dino.data.coco_masks.write_stuffthingmaps`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from talk2dino.data.converters import (
    CONTEXT_SOURCES_HELP,
    MissingDependencyError,
    cityscapes_train_ids,
    coco_object_from_stuffthingmap,
    coco_stuff_train_ids,
    context_from_459,
    context_mapping,
    read_numbered_names_file,
)
from talk2dino.data.samples import read_label_png
from talk2dino.errors import InvalidInputError
from talk2dino.fileio import atomic_path

__all__ = [
    "ConversionCounts",
    "convert_cityscapes",
    "convert_coco_object",
    "convert_coco_stuff",
    "convert_context",
    "write_label_map_png",
]

logger = logging.getLogger(__name__)

_CONVERTED_SUFFIXES = ("_labelTrainIds.png", "_instanceTrainIds.png")
_CITYSCAPES_IDS_SUFFIX = "_gtFine_labelIds.png"
_CITYSCAPES_TRAIN_SUFFIX = "_gtFine_labelTrainIds.png"
_COCO_OBJECT_SUFFIX = "_instanceTrainIds.png"
_COCO_STUFF_SUFFIX = "_labelTrainIds.png"
_CONTEXT_ANN_DIR = "SegmentationClassContext"
_CONTEXT_SPLIT = "ImageSets/SegmentationContext/val.txt"
_VOC_MAIN_VAL = "ImageSets/Main/val.txt"
_CONTEXT_MAT_FIELD = "LabelMap"


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


def _require_dir(path: Path, what: str, help_text: str = "") -> None:
    if not path.is_dir():
        raise InvalidInputError(f"{path}: {what} not found" + (f"; {help_text}" if help_text else ""))


def _names_file(path: Path, error: InvalidInputError) -> bool:
    return str(error).startswith(str(path))


def write_label_map_png(path: Path, labels: np.ndarray) -> None:
    """Write ``[H, W]`` label values in [0, 255] as an 8-bit single-channel ("L") PNG, atomically."""
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


def _write_converted(pairs: list[tuple[Path, Path]], *, convert: Callable[[Any, Path], np.ndarray],
                     overwrite: bool, read: Callable[[Path], Any] | None = None) -> ConversionCounts:
    """Write ``convert(read(input), input)`` to each ``(input, output)`` pair's output, skipping existing outputs
    unless `overwrite`. Errors of `read` propagate as they are; those of `convert` name the input file."""
    written = skipped = 0
    for path, output in pairs:
        if output.exists() and not overwrite:
            skipped += 1
            continue
        data = read(path) if read is not None else None
        try:
            labels = convert(data, path)
        except InvalidInputError as exc:
            if _names_file(path, exc):
                raise
            raise InvalidInputError(f"{path}: {exc}") from exc
        write_label_map_png(output, labels)
        written += 1
    return ConversionCounts(written=written, skipped=skipped)


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
    counts = _write_converted([(path, target / f"{path.stem}{suffix}") for path in inputs], read=read_label_png,
                              convert=lambda raw, path: convert(raw, source=str(path)), overwrite=overwrite)
    logger.info("%s: wrote %d %s maps to %s, kept %d existing", source, counts.written, suffix, target,
                counts.skipped)
    return counts


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
    pairs = [(path, path.with_name(path.name[: -len(_CITYSCAPES_IDS_SUFFIX)] + _CITYSCAPES_TRAIN_SUFFIX))
             for path in inputs]
    counts = _write_converted(pairs, convert=lambda _, path: cityscapes_train_ids(read_label_png(path)),
                              overwrite=overwrite)
    logger.info("%s: wrote %d train-id maps, kept %d existing", root, counts.written, counts.skipped)
    return counts


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
    counts = _write_converted([(path, target / f"{path.stem}.png") for path in inputs],
                              convert=lambda _, path: context_from_459(_read_459_map(path), mapping),
                              overwrite=overwrite)
    _write_context_split(voc2010, set(stems), overwrite=overwrite)
    logger.info("%s: wrote %d PASCAL-Context maps to %s, kept %d existing", source, counts.written, target,
                counts.skipped)
    return counts


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
