"""Reading a benchmark's samples: the (image, label map) pairs of a split and their pixels (method.md §5.2).

- :func:`list_samples`: the pairs of a split, with the pairing rule of §5.2;
- :func:`load_label` / :func:`read_label_png`: label maps as ``[H, W]`` int64 class indices, read unchanged
  (palette PNGs give their indices; never converted to RGB);
- :func:`check_sample` / :func:`load_sample`: image and label map together, sizes checked.

The specs these read (`BenchmarkSpec`, the eight benchmarks, user folders) are the table in
`talk2dino.data.benchmarks`. Only files are read here; neither torch nor any evaluation code is imported.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from talk2dino.data.benchmarks import (
    FOLDER_IMAGE_SUFFIXES,
    PREPARE_HINTS,
    BenchmarkSpec,
    Sample,
    folder_layout_hint,
    is_file,
)
from talk2dino.errors import InvalidInputError, error_reason, one_line
from talk2dino.fileio import stays_inside

__all__ = ["check_sample", "list_samples", "load_label", "load_sample", "read_label_png"]

logger = logging.getLogger(__name__)

_MAX_LISTED = 5  # missing files named in one error message before "... and N more"
_INDEX_MODES = frozenset({"P", "L", "1", "I", "I;16", "I;16L", "I;16B", "I;16N"})


def list_samples(spec: BenchmarkSpec, root: str | os.PathLike[str]) -> list[Sample]:
    """The (image, label map) pairs of a split, sorted by name.

    Pairing rule (method.md §5.2): the label map of ``<image_dir>/<rel>/<stem><image_suffix>`` is
    ``<ann_dir>/<rel>/<stem><ann_suffix>``. With a split file, its non-blank lines are the stems (relative
    to ``image_dir``); without one, every image in ``image_dir`` (recursively when ``spec.recursive``) is used.
    Hidden files and folders (name starting with ``.``) are skipped.

    Args:
        spec: The benchmark.
        root: The dataset folder, e.g. ``<data_root>/VOCdevkit/VOC2012`` (see :func:`dataset_root`).

    Returns:
        The samples, sorted by :attr:`Sample.name`.

    Raises:
        InvalidInputError: A missing folder, split file, image or label map (the message names the paths and
            says how the files are obtained), a stem listed twice in the split file, an image stem found with
            two suffixes, or an empty split.
    """
    dataset = Path(root)
    hint = PREPARE_HINTS.get(spec.name, "") if spec.name != "folder" else folder_layout_hint(spec)
    hint_text = f"; {hint}" if hint else ""
    if not dataset.is_dir():
        raise InvalidInputError(f"{dataset}: dataset folder of {spec.name} not found{hint_text}")
    image_dir = dataset / spec.image_dir
    ann_dir = dataset / spec.ann_dir
    for folder, what in ((image_dir, "image"), (ann_dir, "label-map")):
        if not folder.is_dir():
            misplaced = _misplaced_root_hint(spec, dataset)
            raise InvalidInputError(f"{folder}: {what} folder of {spec.name} not found{misplaced}{hint_text}")

    if spec.split_file is not None:
        images = _images_from_split(spec, dataset, image_dir)
    else:
        images = _scan_images(spec, image_dir)
    if not images:
        where = f"split file {dataset / spec.split_file}" if spec.split_file else f"folder {image_dir}"
        wanted = spec.image_suffix if spec.image_suffix is not None else "/".join(FOLDER_IMAGE_SUFFIXES)
        raise InvalidInputError(f"{where}: empty split, no '*{wanted}' images for {spec.name}{hint_text}")

    samples: list[Sample] = []
    missing: list[Path] = []
    for name in sorted(images):
        label = ann_dir / f"{name}{spec.ann_suffix}"
        if not is_file(label):
            missing.append(label)
            continue
        samples.append(Sample(name=name, image=images[name], label=label))
    if missing:
        raise InvalidInputError(
            f"{len(missing)} of {len(images)} label maps of {spec.name} not found: {_list_paths(missing)}{hint_text}"
        )
    if spec.num_images is not None and len(samples) != spec.num_images:
        logger.info("%s: %d samples found under %s; the full split has %d", spec.name, len(samples), dataset,
                    spec.num_images)
    return samples


def read_label_png(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a label-map PNG's pixel values unchanged, as class indices.

    Palette (``P``) images give their indices, never colours; 8-bit greyscale, bilevel and 16-bit greyscale
    images give their values. Colour images are refused: an RGB-coloured label map has no defined indices.

    Args:
        path: The label-map file.

    Returns:
        ``[H, W]`` int64, the stored values (0..255, or 0..65535 for 16-bit files).

    Raises:
        InvalidInputError: Missing, unreadable or multi-channel file; the message names the file.
    """
    from talk2dino.data.images import DECODE_ERRORS, MAX_IMAGE_PIXELS

    file_path = Path(path)
    shown = one_line(file_path, max_chars=1000)
    if not is_file(file_path):
        raise InvalidInputError(f"{shown}: label map not found")
    try:
        with Image.open(file_path) as image:
            mode = image.mode
            if mode not in _INDEX_MODES:
                raise InvalidInputError(
                    f"{shown}: label map has mode {one_line(repr(mode))}; expected a single-channel PNG of class "
                    "indices (palette 'P', greyscale 'L' or 16-bit), not a colour rendering"
                )
            width, height = image.size
            # Same decompression-bomb guard as load_image, checked from the header before decoding.
            if width * height > MAX_IMAGE_PIXELS:
                raise InvalidInputError(
                    f"{shown}: label map is {width}x{height} pixels, above the limit of {MAX_IMAGE_PIXELS:,}; "
                    "refused without decoding"
                )
            values = np.array(image)
    except InvalidInputError:
        raise
    except DECODE_ERRORS as exc:
        raise InvalidInputError(f"{shown}: cannot read label map ({error_reason(exc)})") from exc
    if values.ndim != 2:
        raise InvalidInputError(f"{shown}: label map must be 2-D; got shape {values.shape}")
    return values.astype(np.int64)


def load_label(path: str | os.PathLike[str], spec: BenchmarkSpec) -> np.ndarray:
    """Read a benchmark label map: values unchanged, then ``reduce_zero_label``, then a range check.

    ``reduce_zero_label`` (method.md §5.1): 0 becomes ``ignore_index``, ``ignore_index`` stays, every other v
    becomes v − 1. Afterwards every value is a class index in ``[0, spec.num_classes)`` or ``ignore_index``.

    Args:
        path: The label-map PNG.
        spec: The benchmark it belongs to.

    Returns:
        ``[H, W]`` int64 class indices in ``[0, C)`` or ``spec.ignore_index``.

    Raises:
        InvalidInputError: Unreadable file, or stored values outside the benchmark's range (message names the
            file and the offending values).
    """
    raw = read_label_png(path)
    num_classes = spec.num_classes
    ignore = spec.ignore_index
    if spec.reduce_zero_label:
        # Check before shifting so that e.g. a 16-bit 256 cannot turn into the ignore value.
        valid = (raw <= num_classes) | (raw == ignore)
        allowed = f"0..{num_classes} (0 = unlabelled) or {ignore}"
    else:
        valid = (raw < num_classes) | (raw == ignore)
        allowed = f"0..{num_classes - 1} or {ignore}"
    valid &= raw >= 0
    if not bool(valid.all()):
        bad = np.unique(raw[~valid])
        shown = ", ".join(str(int(value)) for value in bad[:10]) + (" ..." if bad.size > 10 else "")
        raise InvalidInputError(
            f"{one_line(path)}: label values {shown} are outside the {num_classes} classes of {spec.name}; allowed "
            f"{allowed} (ignore). Is this the right annotation file for {spec.name}?"
        )
    if not spec.reduce_zero_label:
        return raw
    reduced = raw - 1
    reduced[(raw == 0) | (raw == ignore)] = ignore
    return reduced


def check_sample(image_hw: tuple[int, int] | Sequence[int], label: np.ndarray, sample: Sample) -> None:
    """Check that a label map has the size of its image.

    Args:
        image_hw: ``(H, W)`` of the decoded image (after EXIF orientation).
        label: ``[H, W]`` label map.
        sample: The pair both came from (named in the error).

    Raises:
        InvalidInputError: The sizes differ; the message names both files and both sizes.
    """
    height, width = int(image_hw[0]), int(image_hw[1])
    if tuple(label.shape) != (height, width):
        raise InvalidInputError(
            f"{sample.label}: label map is {label.shape[1]}x{label.shape[0]} (WxH) but its image {sample.image} is "
            f"{width}x{height}; label maps must have their image's size"
        )


def load_sample(sample: Sample, spec: BenchmarkSpec) -> tuple[np.ndarray, np.ndarray]:
    """Load an image and its label map and check that their sizes agree.

    Returns:
        ``(image, label)``: image ``[H, W, 3]`` uint8, RGB, values in [0, 255]; label ``[H, W]`` int64 class
        indices in ``[0, C)`` or ``spec.ignore_index`` (see :func:`load_label`).

    Raises:
        InvalidInputError: Unreadable files, bad label values or a size mismatch.
    """
    from talk2dino.data.images import load_image

    image = load_image(sample.image)
    label = load_label(sample.label, spec)
    check_sample(image.shape[:2], label, sample)
    return image, label


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def _list_paths(paths: Sequence[Path]) -> str:
    shown = ", ".join(one_line(path) for path in paths[:_MAX_LISTED])
    more = len(paths) - _MAX_LISTED
    return shown + (f" ... and {more} more" if more > 0 else "")


def _misplaced_root_hint(spec: BenchmarkSpec, given: Path) -> str:
    """If the user passed the data root instead of the dataset folder, say so."""
    nested = given / spec.root
    if spec.root not in ("", ".") and not Path(spec.root).is_absolute() and (nested / spec.image_dir).is_dir():
        return f" (pass the dataset folder {nested}, not the data root {given})"
    return ""


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _image_stem(file_name: str, spec: BenchmarkSpec) -> str | None:
    """The stem of an image file name under the spec's suffix rule, or None if it is not an image."""
    if spec.image_suffix is None:
        lowered = file_name.lower()
        for suffix in FOLDER_IMAGE_SUFFIXES:
            if lowered.endswith(suffix) and len(file_name) > len(suffix):
                return file_name[: -len(suffix)]
        return None
    if file_name.endswith(spec.image_suffix) and len(file_name) > len(spec.image_suffix):
        return file_name[: -len(spec.image_suffix)]
    return None


def _scan_images(spec: BenchmarkSpec, image_dir: Path) -> dict[str, Path]:
    """All images of ``image_dir``: relative stem ('/'-separated) -> path."""
    candidates = image_dir.rglob("*") if spec.recursive else image_dir.iterdir()
    found: dict[str, Path] = {}
    for path in candidates:
        relative = path.relative_to(image_dir)
        if _is_hidden(relative) or not path.is_file():
            continue
        stem = _image_stem(path.name, spec)
        if stem is None:
            continue
        name = (relative.parent / stem).as_posix()
        if name in found:
            raise InvalidInputError(
                f"{image_dir}: image stem {name!r} exists twice ({found[name].name} and {path.name}); keep one, or "
                "set image_suffix"
            )
        found[name] = path
    return found


def _images_from_split(spec: BenchmarkSpec, dataset: Path, image_dir: Path) -> dict[str, Path]:
    assert spec.split_file is not None
    split_path = dataset / spec.split_file
    if not split_path.is_file():
        hint = PREPARE_HINTS.get(spec.name, "")
        raise InvalidInputError(f"{split_path}: split file of {spec.name} not found" + (f"; {hint}" if hint else ""))
    try:
        lines = split_path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{split_path}: cannot read split file ({one_line(exc)})") from exc
    available = _scan_images(spec, image_dir) if spec.image_suffix is None else None
    images: dict[str, Path] = {}
    missing: list[Path] = []
    for line_number, line in enumerate(lines, start=1):
        stem = line.strip()
        if not stem:
            continue
        if stem in images:
            raise InvalidInputError(f"{split_path}:{line_number}: stem {one_line(repr(stem))} is listed twice")
        if not stays_inside(stem):
            # A stem names a file inside image_dir; anything else would read files outside the dataset.
            raise InvalidInputError(
                f"{split_path}:{line_number}: stem {one_line(repr(stem))} is not a relative name inside {image_dir}"
            )
        if available is not None:
            if stem not in available:
                missing.append(image_dir / f"{stem}{{{','.join(FOLDER_IMAGE_SUFFIXES)}}}")
                continue
            images[stem] = available[stem]
            continue
        image = image_dir / f"{stem}{spec.image_suffix}"
        if not is_file(image):
            missing.append(image)
            continue
        images[stem] = image
    if missing:
        raise InvalidInputError(
            f"{split_path}: {len(missing)} listed images of {spec.name} not found: {_list_paths(missing)}"
        )
    return images
