"""Writers for segmentation outputs, shared by the CLI and the HTTP server.

Every file is written atomically: to a temporary file in the destination folder, then renamed over the
destination with :func:`os.replace`. A reader therefore sees either the old file or the complete new one, and
a failed write leaves the old file untouched.

Label colours follow the PASCAL VOC colour map, so index 0 is black and class ``k`` always gets the same colour.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from talk2dino.errors import InvalidInputError

if TYPE_CHECKING:
    import torch

__all__ = [
    "MAX_PALETTE_COLORS",
    "atomic_path",
    "atomic_write_bytes",
    "overlay",
    "palette",
    "save_json",
    "save_label_png",
    "save_overlay_png",
    "save_scores_npz",
    "summarize",
]

logger = logging.getLogger(__name__)

MAX_PALETTE_COLORS: int = 256
"""A palette PNG stores at most 256 colours, so label maps may hold at most 256 classes (indices 0-255)."""

DEFAULT_OVERLAY_ALPHA: float = 0.5
"""Weight of the class colour in :func:`overlay`; the image gets ``1 - alpha``."""

_FLOAT16_MAX = float(np.finfo(np.float16).max)
_SHARE_DECIMALS = 6
_BACKGROUND_NAME = "background"


def palette(num_colors: int) -> np.ndarray:
    """Deterministic, distinct label colours: the PASCAL VOC colour map.

    Colour ``k`` spreads the bits of ``k`` over the high bits of the three channels (bit 0 -> red, bit 1 ->
    green, bit 2 -> blue, then the next bit plane one position lower), so index 0 is black, 1 is (128, 0, 0),
    2 is (0, 128, 0), 3 is (128, 128, 0) and all 256 colours are distinct.

    Args:
        num_colors: Number of colours, in [0, 256].

    Returns:
        ``[num_colors, 3]`` uint8, RGB, values in [0, 255].

    Raises:
        InvalidInputError: ``num_colors`` is negative or above :data:`MAX_PALETTE_COLORS`.
    """
    if not 0 <= num_colors <= MAX_PALETTE_COLORS:
        raise InvalidInputError(
            f"palette supports 0 to {MAX_PALETTE_COLORS} colours (a palette PNG's limit); got {num_colors}"
        )
    colors = np.zeros((num_colors, 3), dtype=np.uint8)
    for index in range(num_colors):
        code = index
        red = green = blue = 0
        for bit_plane in range(8):
            red |= ((code >> 0) & 1) << (7 - bit_plane)
            green |= ((code >> 1) & 1) << (7 - bit_plane)
            blue |= ((code >> 2) & 1) << (7 - bit_plane)
            code >>= 3
        colors[index] = (red, green, blue)
    return colors


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it over ``path`` on success, delete it on failure.

    The temporary name is hidden (leading ``.``), unique, and keeps ``path``'s extension, so writers that pick
    a format from the extension (Pillow, numpy) behave as for the final name. The temporary file is created by
    the caller's writer, so it gets the process's normal permissions. The parent folder must exist.

    Args:
        path: Final destination. An existing file there is replaced only once the body has succeeded.

    Yields:
        The temporary path to write to.

    Raises:
        Whatever the body raises, after the temporary file is removed; ``FileNotFoundError`` if the body
        succeeds without creating the temporary file.
    """
    final = Path(path)
    temporary = final.with_name(f".{final.stem}.{uuid.uuid4().hex[:12]}.tmp{final.suffix}")
    try:
        yield temporary
        os.replace(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    logger.debug("wrote %s", final)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`).

    Args:
        path: Destination file; its parent folder must exist.
        data: The complete file content.
    """
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def save_label_png(path: str | os.PathLike[str], labels: np.ndarray, num_classes: int) -> None:
    """Save a label map as a palette ("P" mode) PNG, atomically.

    Pixel values in the file are the class indices themselves; the PNG palette gives them the colours of
    :func:`palette`, so the file is both viewable and machine-readable (``np.array(Image.open(path))``).

    Args:
        path: Destination ``.png`` file; its parent folder must exist.
        labels: ``[H, W]`` integer class indices in [0, num_classes).
        num_classes: Number of classes C (score channels, background included), in [1, 256].

    Raises:
        InvalidInputError: ``labels`` is not a 2-D integer array, holds values outside [0, num_classes), or
            ``num_classes`` is outside [1, 256].
    """
    indices = _validated_labels(labels, num_classes)
    image = Image.fromarray(indices)  # mode "L"; putpalette turns it into "P"
    image.putpalette(palette(num_classes).tobytes())
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    alpha: float = DEFAULT_OVERLAY_ALPHA,
    background_index: int | None = None,
) -> np.ndarray:
    """Blend class colours over an image.

    Each pixel becomes ``floor((1 - alpha) * image + alpha * palette(num_classes)[label] + 0.5)`` (rounded to
    the nearest integer, halves up); pixels labelled ``background_index`` keep the image's value exactly.

    Args:
        image: ``[H, W, 3]`` uint8, RGB, values in [0, 255].
        labels: ``[H, W]`` integer class indices in [0, num_classes), same H and W as ``image``.
        num_classes: Number of classes C (background included), in [1, 256].
        alpha: Weight of the class colour, in [0, 1].
        background_index: Class index left uncoloured, or None to colour every class.

    Returns:
        ``[H, W, 3]`` uint8, RGB, a new array.

    Raises:
        InvalidInputError: Bad shapes, dtypes, label values, ``alpha`` or ``background_index``.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        described = f"shape {getattr(image, 'shape', None)}, dtype {getattr(image, 'dtype', type(image).__name__)}"
        raise InvalidInputError(f"overlay expects a uint8 HxWx3 RGB image; got {described}")
    indices = _validated_labels(labels, num_classes)
    if indices.shape != image.shape[:2]:
        raise InvalidInputError(
            f"labels shape {indices.shape} does not match image shape {image.shape[:2]}; resize one to the other"
        )
    if not 0.0 <= alpha <= 1.0:
        raise InvalidInputError(f"overlay alpha must be in [0, 1]; got {alpha}")
    if background_index is not None and not 0 <= background_index < num_classes:
        raise InvalidInputError(f"background_index must be in [0, {num_classes}); got {background_index}")
    colors = palette(num_classes).astype(np.float64)[indices]
    blended = np.floor((1.0 - alpha) * image.astype(np.float64) + alpha * colors + 0.5)
    result = np.clip(blended, 0, 255).astype(np.uint8)
    if background_index is not None:
        keep = indices == background_index
        result[keep] = image[keep]
    return result


def save_overlay_png(
    path: str | os.PathLike[str],
    image: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    alpha: float = DEFAULT_OVERLAY_ALPHA,
    background_index: int | None = None,
) -> None:
    """Save :func:`overlay` of ``image`` and ``labels`` as an RGB PNG, atomically.

    Args:
        path: Destination ``.png`` file; its parent folder must exist.
        image: ``[H, W, 3]`` uint8, RGB, values in [0, 255].
        labels: ``[H, W]`` integer class indices in [0, num_classes).
        num_classes: Number of classes C (background included), in [1, 256].
        alpha: Weight of the class colour, in [0, 1].
        background_index: Class index left uncoloured, or None.

    Raises:
        InvalidInputError: As :func:`overlay`.
    """
    blended = overlay(image, labels, num_classes, alpha=alpha, background_index=background_index)
    with atomic_path(path) as temporary:
        Image.fromarray(blended).save(temporary, format="PNG")


def save_scores_npz(
    path: str | os.PathLike[str], scores: np.ndarray | torch.Tensor, class_names: Sequence[str]
) -> None:
    """Save per-class score maps as a compressed ``.npz``, atomically.

    The archive holds ``scores``: ``[C, H, W]`` float16, and ``class_names``: ``[C]`` unicode strings (numpy
    ``<U`` dtype, so ``np.load`` reads it without ``allow_pickle``). float16 keeps probabilities in [0, 1] to
    about 3 significant digits at half the size.

    Args:
        path: Destination file (conventionally ``.npz``; the name is used exactly as given).
        scores: ``[C, H, W]`` floating point scores, e.g. per-class probabilities in [0, 1]; a tensor may live
            on any device.
        class_names: The C class names, in channel order.

    Raises:
        InvalidInputError: ``scores`` is not 3-D floating point, its C differs from ``len(class_names)``, or a
            value does not fit in float16.
    """
    array = _to_numpy(scores)
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.floating):
        raise InvalidInputError(f"scores must be a [C, H, W] float array; got shape {array.shape}, dtype {array.dtype}")
    names = [str(name) for name in class_names]
    if array.shape[0] != len(names):
        raise InvalidInputError(f"scores have {array.shape[0]} channels but {len(names)} class names were given")
    finite = array[np.isfinite(array)]
    if finite.size and float(np.abs(finite).max()) > _FLOAT16_MAX:
        raise InvalidInputError(f"scores exceed the float16 range (|value| > {_FLOAT16_MAX:g}); save probabilities")
    name_array = np.array(names, dtype=np.str_) if names else np.zeros((0,), dtype="<U1")
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        # A file handle, not a name: np.savez_compressed would append ".npz" to a name lacking it.
        np.savez_compressed(handle, scores=array.astype(np.float16), class_names=name_array)


def summarize(labels: np.ndarray, class_names: Sequence[str], *, background_index: int | None) -> list[dict[str, Any]]:
    """Count the pixels of each class in a label map.

    Args:
        labels: ``[H, W]`` integer class indices in [0, len(class_names)).
        class_names: The C class names in index order, including the background entry when there is one.
        background_index: Index of the background class, reported with the name ``"background"``; or None.

    Returns:
        One dict per class, in index order, zero-pixel classes included: ``{"index": int, "name": str,
        "pixels": int, "share": float}``, where ``share`` is the fraction of all pixels, rounded to 6 decimals
        (0.0 for an empty map). Plain Python types, ready for :func:`save_json`.

    Raises:
        InvalidInputError: Bad labels (see :func:`save_label_png`) or ``background_index`` out of range.
    """
    num_classes = len(class_names)
    indices = _validated_labels(labels, num_classes, max_classes=None)
    if background_index is not None and not 0 <= background_index < num_classes:
        raise InvalidInputError(f"background_index must be in [0, {num_classes}); got {background_index}")
    counts = np.bincount(indices.ravel(), minlength=num_classes)
    total = int(indices.size)
    summary: list[dict[str, Any]] = []
    for index, name in enumerate(class_names):
        pixels = int(counts[index])
        summary.append(
            {
                "index": index,
                "name": _BACKGROUND_NAME if index == background_index else str(name),
                "pixels": pixels,
                "share": round(pixels / total, _SHARE_DECIMALS) if total else 0.0,
            }
        )
    return summary


def save_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as UTF-8 JSON (indent 2, non-ASCII kept as is, trailing newline), atomically.

    numpy scalars and arrays are written as Python numbers and lists, and paths as strings.

    Args:
        path: Destination file; its parent folder must exist.
        obj: A JSON-serialisable object.

    Raises:
        TypeError: ``obj`` holds something JSON cannot represent.
    """
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default)
    atomic_write_bytes(path, (text + "\n").encode("utf-8"))


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def _validated_labels(
    labels: np.ndarray, num_classes: int, *, max_classes: int | None = MAX_PALETTE_COLORS
) -> np.ndarray:
    """Check ``[H, W]`` integer labels in [0, num_classes); return them as uint8 (or int64 if unbounded)."""
    if max_classes is not None and not 1 <= num_classes <= max_classes:
        raise InvalidInputError(f"num_classes must be in [1, {max_classes}] for a palette image; got {num_classes}")
    array = _to_numpy(labels)
    if array.ndim != 2 or not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise InvalidInputError(f"labels must be an [H, W] integer array; got shape {array.shape}, dtype {array.dtype}")
    if array.size:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= num_classes:
            raise InvalidInputError(
                f"labels must lie in [0, {num_classes}) for {num_classes} classes; got values in [{low}, {high}]"
            )
    return array.astype(np.uint8 if max_classes is not None else np.int64)


def _to_numpy(values: Any) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values
    detach = getattr(values, "detach", None)
    if callable(detach):  # a torch tensor; torch is not imported here unless the caller already has it
        tensor = detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()
        return np.asarray(tensor.numpy())
    return np.asarray(values)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")
