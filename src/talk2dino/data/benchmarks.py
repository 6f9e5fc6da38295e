"""The benchmark table: datasets in their standard published layouts, and user datasets in a simple folder layout.

See method.md §5.1 (the eight benchmarks), §5.2 (folder layouts and file suffixes), §4.2 and pitfall P25
(class names verbatim) and Appendix A (the class lists, stored in ``talk2dino/assets/classes.json``).

Data, not readers (those are in `talk2dino.data.samples`); it imports neither torch nor any evaluation code:

- :data:`BENCHMARKS` / :func:`get_benchmark`: one :class:`BenchmarkSpec` per benchmark (class names, ignore index,
  ``reduce_zero_label``, background handling, folder layout, suffixes, split file);
- :func:`folder_benchmark`: a spec for the user's own data (images + PNG label maps + a class-names file);
- :data:`PREPARE_HINTS`: how each benchmark's label maps are obtained (appended to "not found" errors).

Class order of PASCAL-Context. Appendix A prints the 59 Context names in the order of the official
``59_labels.txt``, but the label maps that §5.2 prescribes (``SegmentationClassContext``, built by
mmsegmentation's PASCAL-Context converter) number the classes in **alphabetical** order: that converter maps the
sorted 459-class ids of the 59 classes to 1..59, and mmsegmentation 0.30's ``PascalContextDataset.CLASSES`` (which
the reference evaluates with) lists them alphabetically after ``background``. ``classes.json`` therefore stores
the Appendix A strings verbatim, in mmsegmentation's label order; the other five lists are in Appendix A's order,
which already is mmsegmentation's.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from talk2dino.data import FOLDER_LAYOUT_HELP
from talk2dino.errors import InvalidInputError, one_line

__all__ = [
    "BENCHMARKS",
    "DEFAULT_IGNORE_INDEX",
    "FOLDER_IMAGE_SUFFIXES",
    "FOLDER_LAYOUT_HELP",
    "PREPARE_HINTS",
    "BenchmarkSpec",
    "Sample",
    "benchmark_names",
    "class_lists",
    "dataset_root",
    "folder_benchmark",
    "folder_layout_hint",
    "get_benchmark",
    "is_file",
    "read_class_names_file",
]

logger = logging.getLogger(__name__)

DEFAULT_IGNORE_INDEX: int = 255
"""Ground-truth value excluded from the metric on every benchmark (method.md §5.1)."""

FOLDER_IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")
"""Image extensions (matched case-insensitively) accepted by a folder dataset whose ``image_suffix`` is None."""



@dataclass(frozen=True)
class BenchmarkSpec:
    """Everything needed to read one benchmark's validation split and score it (method.md §5.1, §5.2).

    Per-model thresholds θ live in the model registry, not here. Paths are relative: ``root`` to a data root
    chosen by the user, ``image_dir`` / ``ann_dir`` / ``split_file`` to the dataset root.
    """

    name: str  # registry key: voc20, voc21, context59, context60, coco_stuff, coco_object, cityscapes, ade20k, folder
    tag: str  # short column name of the results tables: V20, V21, C59, C60, Stuff, Obj, City, ADE (§5.1)
    class_names: tuple[str, ...]  # verbatim, in label order; 'background' first for background benchmarks (§4.2)
    background: bool  # class 0 comes from the threshold channel; the model's vocabulary is class_names[1:] (§4.6)
    reduce_zero_label: bool  # GT 0 -> ignore, 255 stays, v -> v - 1, before the range check (§5.1)
    bg_clean: bool  # background cleaning in the published protocol (§5.1 table, "Cleaning" column)
    root: str  # dataset folder relative to the data root (absolute for folder datasets) (§5.2)
    image_dir: str  # images, relative to the dataset folder (§5.2)
    ann_dir: str  # label maps, relative to the dataset folder (§5.2)
    image_suffix: str | None  # image name ending; None = any of FOLDER_IMAGE_SUFFIXES, case-insensitive (§5.2)
    ann_suffix: str  # label-map name ending, replacing image_suffix at the same relative location (§5.2)
    split_file: str | None  # list of image stems relative to the dataset folder; None = every image (§5.2)
    recursive: bool = False  # look for images in sub-folders too (Cityscapes' <city>/ folders) (§5.2)
    ignore_index: int = DEFAULT_IGNORE_INDEX  # GT value excluded from the metric (§5.1)
    num_images: int | None = None  # expected size of the split, informational (§5.1); None if unknown

    def __post_init__(self) -> None:
        names = self.class_names
        if not names:
            raise InvalidInputError(f"benchmark {self.name!r} has no class names")
        if not 0 <= self.ignore_index <= 65535:
            raise InvalidInputError(f"ignore_index must be in [0, 65535]; got {self.ignore_index}")
        if len(names) > self.ignore_index:
            raise InvalidInputError(
                f"benchmark {self.name!r} has {len(names)} classes, so its labels reach the ignore index "
                f"{self.ignore_index}; at most {self.ignore_index} classes are supported"
            )
        for position, class_name in enumerate(names):
            if not isinstance(class_name, str) or not class_name.strip():
                raise InvalidInputError(f"benchmark {self.name!r}: class {position} has an empty name")
        duplicates = sorted({class_name for class_name in names if names.count(class_name) > 1})
        if duplicates:
            raise InvalidInputError(f"benchmark {self.name!r}: class names must be unique; repeated: {duplicates}")
        if self.background and len(names) < 2:
            raise InvalidInputError(f"benchmark {self.name!r}: a background benchmark needs at least 2 classes")

    @property
    def num_classes(self) -> int:
        """Number of label values that count in the metric, background included (= score channels C)."""
        return len(self.class_names)

    @property
    def vocabulary(self) -> tuple[str, ...]:
        """The class names given to the text encoder: ``class_names[1:]`` on background benchmarks (§4.2)."""
        return self.class_names[1:] if self.background else self.class_names


@dataclass(frozen=True)
class Sample:
    """One image of a split and its label map."""

    name: str  # image stem relative to the image folder, '/'-separated (e.g. 'frankfurt/frankfurt_000000_000294')
    image: Path  # image file
    label: Path  # label-map PNG


@lru_cache(maxsize=1)
def class_lists() -> dict[str, tuple[str, ...]]:
    """The class-name lists shipped in ``talk2dino/assets/classes.json``, verbatim (method.md Appendix A).

    Returns:
        ``{"voc21", "context60", "coco_object", "coco_stuff", "cityscapes", "ade20k"}`` → names in label order.
    """
    text = resources.files("talk2dino").joinpath("assets", "classes.json").read_text(encoding="utf-8")
    return {key: tuple(names) for key, names in json.loads(text).items()}


def _build_benchmarks() -> dict[str, BenchmarkSpec]:
    lists = class_lists()

    def voc(name: str, tag: str, names: tuple[str, ...], *, background: bool, reduce: bool, clean: bool,
            year: str, ann_dir: str, split: str, num_images: int) -> BenchmarkSpec:
        return BenchmarkSpec(name=name, tag=tag, class_names=names, background=background, reduce_zero_label=reduce,
                             bg_clean=clean, root=f"VOCdevkit/VOC{year}", image_dir="JPEGImages", ann_dir=ann_dir,
                             image_suffix=".jpg", ann_suffix=".png", split_file=split, num_images=num_images)

    def coco(name: str, tag: str, names: tuple[str, ...], *, background: bool, clean: bool,
             ann_suffix: str) -> BenchmarkSpec:
        return BenchmarkSpec(name=name, tag=tag, class_names=names, background=background, reduce_zero_label=False,
                             bg_clean=clean, root="coco_stuff164k", image_dir="images/val2017",
                             ann_dir="annotations/val2017", image_suffix=".jpg", ann_suffix=ann_suffix,
                             split_file=None, num_images=5000)

    specs = [
        voc("voc20", "V20", lists["voc21"][1:], background=False, reduce=True, clean=False,
            year="2012", ann_dir="SegmentationClass", split="ImageSets/Segmentation/val.txt", num_images=1449),
        voc("voc21", "V21", lists["voc21"], background=True, reduce=False, clean=True,
            year="2012", ann_dir="SegmentationClass", split="ImageSets/Segmentation/val.txt", num_images=1449),
        voc("context59", "C59", lists["context60"][1:], background=False, reduce=True, clean=False,
            year="2010", ann_dir="SegmentationClassContext", split="ImageSets/SegmentationContext/val.txt",
            num_images=5105),
        voc("context60", "C60", lists["context60"], background=True, reduce=False, clean=False,
            year="2010", ann_dir="SegmentationClassContext", split="ImageSets/SegmentationContext/val.txt",
            num_images=5105),
        coco("coco_stuff", "Stuff", lists["coco_stuff"], background=False, clean=False,
             ann_suffix="_labelTrainIds.png"),
        coco("coco_object", "Obj", lists["coco_object"], background=True, clean=True,
             ann_suffix="_instanceTrainIds.png"),
        BenchmarkSpec(name="cityscapes", tag="City", class_names=lists["cityscapes"], background=False,
                      reduce_zero_label=False, bg_clean=False, root="cityscapes", image_dir="leftImg8bit/val",
                      ann_dir="gtFine/val", image_suffix="_leftImg8bit.png", ann_suffix="_gtFine_labelTrainIds.png",
                      split_file=None, recursive=True, num_images=500),
        BenchmarkSpec(name="ade20k", tag="ADE", class_names=lists["ade20k"], background=False,
                      reduce_zero_label=True, bg_clean=False, root="ade/ADEChallengeData2016",
                      image_dir="images/validation", ann_dir="annotations/validation", image_suffix=".jpg",
                      ann_suffix=".png", split_file=None, num_images=2000),
    ]
    return {spec.name: spec for spec in specs}


BENCHMARKS: dict[str, BenchmarkSpec] = _build_benchmarks()
"""The eight benchmarks of method.md §5.1, by name, in the order of the results tables."""

PREPARE_HINTS: dict[str, str] = {
    "voc20": "the VOC2012 trainval archive holds JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/",
    "voc21": "the VOC2012 trainval archive holds JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/",
    "context59": "build SegmentationClassContext/ and ImageSets/SegmentationContext/val.txt with "
    "`talk2dino convert context` (or talk2dino.data.convert_folders.convert_context)",
    "context60": "build SegmentationClassContext/ and ImageSets/SegmentationContext/val.txt with "
    "`talk2dino convert context` (or talk2dino.data.convert_folders.convert_context)",
    "coco_stuff": "build the *_labelTrainIds.png maps from the raw stuffthingmaps with "
    "`talk2dino convert coco-stuff` (or talk2dino.data.convert_folders.convert_coco_stuff)",
    "coco_object": "build the *_instanceTrainIds.png maps from the raw stuffthingmaps with "
    "`talk2dino convert coco-object` (or talk2dino.data.convert_folders.convert_coco_object)",
    "cityscapes": "build the *_gtFine_labelTrainIds.png maps from *_gtFine_labelIds.png with "
    "`talk2dino convert cityscapes` (or talk2dino.data.convert_folders.convert_cityscapes)",
    "ade20k": "the ADEChallengeData2016 archive holds images/validation/ and annotations/validation/",
}
"""How each benchmark's label maps are obtained; appended to "not found" errors."""


def benchmark_names() -> list[str]:
    """Names of the eight benchmarks, in the order of the results tables (method.md §5.1)."""
    return list(BENCHMARKS)


def get_benchmark(name: str) -> BenchmarkSpec:
    """Look up a benchmark by name.

    Args:
        name: One of :func:`benchmark_names` (for user data see :func:`folder_benchmark`).

    Raises:
        InvalidInputError: Unknown name; the message lists the known ones.
    """
    try:
        return BENCHMARKS[name]
    except KeyError:
        known = ", ".join(BENCHMARKS)
        raise InvalidInputError(
            f"unknown benchmark {name!r}; known benchmarks: {known} (use folder_benchmark for your own data)"
        ) from None


def read_class_names_file(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """Read a class-names file: one name per line, UTF-8, in label order.

    Names are kept verbatim, leading and trailing spaces included (method.md P25); only the line break is
    removed (``\\n``, ``\\r\\n`` or ``\\r``) and a UTF-8 byte-order mark is dropped. A final line break at the end
    of the file is optional.

    Raises:
        InvalidInputError: The file is missing or unreadable, holds no names, or holds an empty (or
            whitespace-only) line; the message names the file and the line number.
    """
    file_path = Path(path)
    shown = one_line(file_path, max_chars=1000)
    if not is_file(file_path):
        raise InvalidInputError(f"{shown}: class-names file not found (one class name per line)")
    try:
        text = file_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{shown}: cannot read class-names file as UTF-8 ({one_line(exc)})") from exc
    lines = text.splitlines()
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            raise InvalidInputError(
                f"{shown}:{line_number}: empty line in the class-names file; every line must hold one name "
                "(remove blank lines)"
            )
    if not lines:
        raise InvalidInputError(f"{shown}: class-names file is empty; write one class name per line")
    return tuple(lines)


def folder_benchmark(
    root: str | os.PathLike[str],
    classes_file: str | os.PathLike[str],
    *,
    background: bool = False,
    reduce_zero_label: bool = False,
    bg_clean: bool = False,
    image_dir: str = "images",
    ann_dir: str = "labels",
    image_suffix: str | None = None,
    ann_suffix: str = ".png",
    split_file: str | None = None,
    recursive: bool = False,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
) -> BenchmarkSpec:
    """A spec for the user's own data: ``root/images/<stem>.jpg`` paired with ``root/labels/<stem>.png``.

    Label maps are single-channel PNGs (8-bit, palette or 16-bit) whose pixel values are class indices in
    ``[0, len(class names))``, or ``ignore_index`` for pixels that do not count.

    Args:
        root: Dataset folder holding ``image_dir`` and ``ann_dir``. Stored in the spec, so pass the spec's
            :func:`dataset_root` (or this same folder) to :func:`list_samples`.
        classes_file: Class-names file, one name per line in label order (see :func:`read_class_names_file`);
            a relative path is relative to the current directory, as usual.
        background: Class 0 is background: it is produced by the threshold channel and its name is not given
            to the text encoder (method.md §4.6).
        reduce_zero_label: Label 0 means "unlabelled": it becomes ``ignore_index`` and every other value v
            becomes v − 1 (method.md §5.1).
        bg_clean: Whether background cleaning is the protocol default for this dataset.
        image_dir: Image folder, relative to ``root``.
        ann_dir: Label-map folder, relative to ``root``.
        image_suffix: Image name ending (e.g. ``".jpg"``); None accepts ``.jpg``, ``.jpeg`` and ``.png`` in any
            letter case (a stem found with two of them is an error).
        ann_suffix: Label-map name ending that replaces the image suffix.
        split_file: Optional list of image stems (one per line) relative to ``root``; None uses every image.
        recursive: Also look for images in sub-folders (labels then sit at the same relative location).
        ignore_index: Label value excluded from the metric.

    Raises:
        InvalidInputError: Unreadable or bad class-names file, or inconsistent options.
    """
    names = read_class_names_file(classes_file)
    return BenchmarkSpec(
        name="folder",
        tag="Folder",
        class_names=names,
        background=background,
        reduce_zero_label=reduce_zero_label,
        bg_clean=bg_clean,
        root=str(Path(root)),
        image_dir=image_dir,
        ann_dir=ann_dir,
        image_suffix=image_suffix,
        ann_suffix=ann_suffix,
        split_file=split_file,
        recursive=recursive,
        ignore_index=ignore_index,
        num_images=None,
    )


def folder_layout_hint(spec: BenchmarkSpec) -> str:
    """:data:`FOLDER_LAYOUT_HELP` for `spec`'s own image and label folders."""
    if (spec.image_dir, spec.ann_dir) == ("images", "labels"):
        return FOLDER_LAYOUT_HELP
    return FOLDER_LAYOUT_HELP.replace("ROOT/images/", f"ROOT/{spec.image_dir}/").replace(
        "ROOT/labels/", f"ROOT/{spec.ann_dir}/")


def dataset_root(spec: BenchmarkSpec, data_root: str | os.PathLike[str]) -> Path:
    """The dataset folder of ``spec`` under ``data_root`` (e.g. ``<data_root>/VOCdevkit/VOC2012``).

    A folder dataset's ``root`` is the folder given to :func:`folder_benchmark`; when it is absolute,
    ``data_root`` is ignored.
    """
    return Path(data_root) / spec.root


def is_file(path: Path) -> bool:
    """``path.is_file()``, but False (not an OSError) for names the file system refuses, e.g. too long."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False
