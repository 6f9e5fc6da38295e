"""COCO Captions 2014 as published: ``annotations/captions_{split}2014.json`` plus ``{split}2014/`` images.

The JSON is read directly (never a re-saved tensor file; method.md pitfall P8). Only the fields the
method needs are read and checked: ``images[*].id``, ``images[*].file_name``, ``annotations[*].id``,
``annotations[*].image_id`` and ``annotations[*].caption``; every other field is ignored.

Rules (method.md §3.1):

- images are sorted by id, so every run and every rank sees the same order; ``limit`` keeps the first N;
- captions are kept per image, sorted by caption id, with their text exactly as published (the CLIP
  tokenizer normalises whitespace itself);
- a caption that is empty after stripping whitespace is skipped and reported;
- a caption whose ``image_id`` names no listed image is skipped and counted (an orphan);
- a missing file, a missing or mistyped field, or a duplicate id is an `InvalidInputError` naming the file
  and the field; ids (``images[*].id``, ``annotations[*].id`` and ``image_id``) must be integers in
  ``[0, 2**63)`` (they are stored as int64), checked here rather than when the first shard is written;
- a JSON object that names a key twice is refused (Python's json would keep the last one silently: a real
  ``"annotations"`` list followed by an empty one would read as no captions);
- a split without any usable caption (after ``limit``, empty and orphan captions) is an error, not an empty
  success;
- an image is opened only if its real path (symlinks resolved) stays inside the real image folder
  (`image_inside`; the folder itself may be a symlink), so a ``file_name`` that is a link to ``/etc/passwd``
  is refused when the extractor opens it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from talk2dino.errors import InvalidInputError, one_line
from talk2dino.fileio import (
    JSON_READ_ERRORS,
    DuplicateKeyError,
    check_regular_file,
    json_loads_unique,
    open_regular,
    stays_inside,
)

__all__ = ["CocoCaption", "CocoCaptions", "CocoImage", "annotation_path", "image_folder", "image_inside",
           "read_coco_captions"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
YEAR = "2014"  # COCO Captions 2014, method.md §3.1
MAX_ID = 2**63  # ids are stored as int64 in the feature shards: [0, MAX_ID)


@dataclass(frozen=True)
class CocoImage:
    """One listed image.

    Attributes:
        image_id: COCO image id.
        file_name: the JSON's ``file_name``, relative to the split's image folder.
        path: ``coco_root/{split}2014/file_name``.
    """

    image_id: int
    file_name: str
    path: Path


@dataclass(frozen=True)
class CocoCaption:
    """One caption annotation (text as published)."""

    caption_id: int
    image_id: int
    text: str


@dataclass
class CocoCaptions:
    """The parsed split.

    Attributes:
        split: "train" or "val".
        annotation_file: the JSON that was read.
        sha256: its sha256, recorded in the features manifest.
        images: listed images sorted by id (the first ``limit`` when a limit was given).
        captions: image id -> its non-empty captions, sorted by caption id (images without captions
            map to an empty list).
        empty_captions: captions skipped because their text is empty after stripping, sorted by id.
        total_images, total_captions: counts in the JSON, before ``limit`` and skipping.
        orphan_captions: captions naming an image id that the JSON does not list (skipped).
    """

    split: str
    annotation_file: Path
    sha256: str
    images: list[CocoImage]
    captions: dict[int, list[CocoCaption]]
    empty_captions: list[CocoCaption] = field(default_factory=list)
    total_images: int = 0
    total_captions: int = 0
    orphan_captions: int = 0

    @property
    def num_captions(self) -> int:
        """Non-empty captions of the kept images."""
        return sum(len(c) for c in self.captions.values())


def annotation_path(coco_root: str | os.PathLike[str], split: str) -> Path:
    """``coco_root/annotations/captions_{split}2014.json``."""
    return Path(coco_root) / "annotations" / f"captions_{split}{YEAR}.json"


def image_folder(coco_root: str | os.PathLike[str], split: str) -> Path:
    """``coco_root/{split}2014``."""
    return Path(coco_root) / f"{split}{YEAR}"


def image_inside(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> Path:
    """The real path of image `path` (symlinks resolved), refusing one that leaves the real `root`.

    ``file_name`` is already checked to be relative without ``..`` (`stays_inside`), but a file in the image
    folder may itself be a symlink (``a.jpg -> /etc/passwd``); the extractor opens the returned real path,
    so a link swapped in after this check would have to replace a folder on that path, not just the file.
    The root itself may be a symlink (a COCO copy on another disk): it is resolved too.

    Raises:
        InvalidInputError: ``"<path>: resolves to <real>, outside the image folder <root>"``.
    """
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    try:
        inside = os.path.commonpath([real_root, real]) == real_root and real != real_root
    except ValueError:  # Windows: paths on different drives
        inside = False
    if not inside:
        raise InvalidInputError(f"{one_line(path, max_chars=1000)}: resolves to {one_line(real, max_chars=1000)}, "
                                f"outside the image folder {one_line(real_root, max_chars=1000)}; not opened")
    return Path(real)



def _field(entry: Any, key: str, kind: type | tuple[type, ...], *, where: str) -> Any:
    if not isinstance(entry, dict):
        raise InvalidInputError(f"{where} is a {type(entry).__name__}, not an object")
    if key not in entry:
        raise InvalidInputError(f"{where} lacks the field {key!r}")
    value = entry[key]
    # bool is an int subclass; an id of `true` is a broken file, not id 1.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidInputError(
            f"{where}.{key} is {one_line(repr(value))} ({type(value).__name__}), expected {_kind_name(kind)}"
        )
    return value


def _id_field(entry: Any, key: str, *, where: str) -> int:
    """An id field: an int (not a bool) in ``[0, MAX_ID)``, else a one-line InvalidInputError."""
    value = _field(entry, key, int, where=where)
    if not 0 <= value < MAX_ID:
        raise InvalidInputError(f"{where}.{key} is {one_line(repr(value), max_chars=40)}, outside [0, 2**63): "
                                "COCO ids are non-negative 64-bit integers")
    return int(value)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def read_coco_captions(coco_root: str | os.PathLike[str], split: str, *, limit: int | None = None) -> CocoCaptions:
    """Read and check the captions JSON of a split.

    Args:
        coco_root: folder holding ``annotations/`` and ``{split}2014/``.
        split: "train" or "val".
        limit: keep only the first N images by id (and their captions); None keeps all.

    Returns:
        The parsed split. Image files are not opened here (unreadable ones are the extractor's business).

    Raises:
        InvalidInputError: an unknown split, a bad limit, a missing annotation file or image folder, invalid
            JSON or a key named twice in one object, a missing/mistyped field, an id outside ``[0, 2**63)`` or
            a duplicate id (the message names the file and the entry), or no image or no usable caption left.
    """
    if split not in SPLITS:
        raise InvalidInputError(f"unknown COCO split {split!r}; use one of {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise InvalidInputError(f"limit must be a positive number of images, got {limit}")
    path = annotation_path(coco_root, split)
    if path.exists():
        check_regular_file(path, "captions file")  # a FIFO would block the read forever; refused by name
    if not path.is_file():
        raise InvalidInputError(
            f"{path}: no such file; coco_root must hold annotations/captions_{split}{YEAR}.json as published "
            f"(from annotations_trainval{YEAR}.zip) and {split}{YEAR}/"
        )
    folder = image_folder(coco_root, split)
    if not folder.is_dir():
        raise InvalidInputError(f"{folder}: no such image folder; unpack {split}{YEAR}.zip into {coco_root}")
    try:
        # open_regular: a FIFO swapped in after the check above must not block the read.
        with open_regular(path, "captions file") as handle:
            raw = handle.read()
        sha256 = hashlib.sha256(raw).hexdigest()  # of the bytes parsed, not of a reopened path
        data = json_loads_unique(raw)
    except InvalidInputError:
        raise
    except DuplicateKeyError as err:
        raise InvalidInputError(f"{path}: {err}; a COCO file names each key once, so this one was edited or "
                                "corrupted (re-download it)") from err
    except JSON_READ_ERRORS as err:
        raise InvalidInputError(f"{path}: not a readable JSON file ({one_line(err)})") from err
    if not isinstance(data, dict):
        raise InvalidInputError(f"{path}: top level is a {type(data).__name__}, expected an object")
    for key in ("images", "annotations"):
        if key not in data:
            raise InvalidInputError(f"{path}: lacks the field {key!r}; is this a COCO captions file?")
        if not isinstance(data[key], list):
            raise InvalidInputError(f"{path}: field {key!r} is a {type(data[key]).__name__}, expected a list")

    images: dict[int, CocoImage] = {}
    for index, entry in enumerate(data["images"]):
        where = f"{path.name}: images[{index}]"
        image_id = _id_field(entry, "id", where=where)
        file_name = _field(entry, "file_name", str, where=where)
        if image_id in images:
            raise InvalidInputError(f"{where}: duplicate image id {image_id}")
        if not file_name or not stays_inside(file_name):
            raise InvalidInputError(
                f"{where}.file_name {one_line(repr(file_name))} is not a file name inside {folder}"
            )
        images[image_id] = CocoImage(image_id, file_name, folder / file_name)

    captions: dict[int, list[CocoCaption]] = {}
    empty: list[CocoCaption] = []
    seen: set[int] = set()
    orphans = 0
    for index, entry in enumerate(data["annotations"]):
        where = f"{path.name}: annotations[{index}]"
        caption_id = _id_field(entry, "id", where=where)
        image_id = _id_field(entry, "image_id", where=where)
        text = _field(entry, "caption", str, where=where)
        if caption_id in seen:
            raise InvalidInputError(f"{where}: duplicate caption id {caption_id}")
        seen.add(caption_id)
        caption = CocoCaption(caption_id, image_id, text)
        if image_id not in images:
            orphans += 1
        elif not text.strip():
            empty.append(caption)
        else:
            captions.setdefault(image_id, []).append(caption)

    ordered = [images[i] for i in sorted(images)]
    if limit is not None:
        ordered = ordered[:limit]
    kept = {image.image_id for image in ordered}
    per_image = {i: sorted(captions.get(i, []), key=lambda c: c.caption_id) for i in sorted(kept)}
    empty = sorted((c for c in empty if c.image_id in kept), key=lambda c: c.caption_id)
    if empty:
        logger.warning("%s: skipping %d empty caption(s), e.g. id %d", path, len(empty), empty[0].caption_id)
    if orphans:
        logger.warning("%s: skipping %d caption(s) whose image_id is not listed in 'images'", path, orphans)
    # Nothing to extract is a broken file (or a limit that keeps only captionless images), not a success
    # with empty shards.
    if not ordered:
        raise InvalidInputError(f"{path}: lists no images")
    usable = sum(len(c) for c in per_image.values())
    if usable == 0:
        raise InvalidInputError(
            f"{path}: no usable caption for the {len(ordered)} image(s) kept ({len(data['annotations'])} listed in "
            f"all, {orphans} naming no listed image, {len(empty)} empty); is this the captions file of the split?")
    result = CocoCaptions(
        split=split, annotation_file=path, sha256=sha256, images=ordered, captions=per_image,
        empty_captions=empty, total_images=len(images), total_captions=len(data["annotations"]),
        orphan_captions=orphans,
    )
    logger.info("%s: %d images, %d captions (%d images kept, %d captions)", path, result.total_images,
                result.total_captions, len(ordered), result.num_captions)
    return result
