"""COCO run-length encoding of masks and label maps, byte-compatible with pycocotools (which is not needed)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from talk2dino.errors import InvalidInputError
from talk2dino.render.arrays import as_numpy
from talk2dino.render.labels import validated_labels

if TYPE_CHECKING:
    import torch

__all__ = ["label_rles", "rle_decode", "rle_encode"]


def rle_encode(mask: np.ndarray | torch.Tensor, *, compressed: bool = True) -> dict[str, Any]:
    """Encode a binary mask as COCO RLE, exactly as ``pycocotools.mask.encode`` does.

    The mask is read in column-major (Fortran) order; ``counts`` alternates run lengths of 0s and 1s and always
    starts with a run of 0s (possibly of length 0). The compressed form is COCO's string: each count (from the
    third on, as the difference to the count two places before) in 5-bit groups, low bits first, each group
    plus a continuation bit (0x20) stored as the character ``chr(48 + group)``.

    Args:
        mask: ``[H, W]`` mask; nonzero values are foreground.
        compressed: True gives ``counts`` as the compressed string, False as a list of ints.

    Returns:
        ``{"size": [H, W], "counts": str | list[int]}``, JSON-ready.

    Raises:
        InvalidInputError: ``mask`` is not 2-D.
    """
    array = as_numpy(mask)
    if array.ndim != 2:
        raise InvalidInputError(f"an RLE mask must be [H, W]; got shape {array.shape}")
    height, width = (int(x) for x in array.shape)
    flat = np.asarray(array != 0).ravel(order="F")
    if flat.size == 0:
        counts: list[int] = [0]
    else:
        changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        runs = np.diff(np.concatenate(([0], changes, [flat.size])))
        counts = ([0] if flat[0] else []) + [int(r) for r in runs]
    return {"size": [height, width], "counts": _rle_to_string(counts) if compressed else counts}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """Decode a COCO RLE (compressed string or list of counts) into an ``[H, W]`` uint8 mask of 0 and 1.

    Raises:
        InvalidInputError: Malformed ``size``/``counts``, or counts that do not add up to H × W.
    """
    try:
        height, width = (int(x) for x in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"an RLE needs 'size': [H, W] and 'counts' ({exc})") from exc
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs = _rle_from_string(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if any(r < 0 for r in runs) or sum(runs) != height * width:
        raise InvalidInputError(f"RLE counts add up to {sum(runs)} pixels, but size is {height}x{width}")
    values = np.zeros(len(runs), dtype=np.uint8)
    values[1::2] = 1
    flat = np.repeat(values, runs)
    return flat.reshape((height, width), order="F")


def label_rles(labels: np.ndarray | torch.Tensor, class_names: Sequence[str], *,
               compressed: bool = True) -> list[dict[str, Any]]:
    """COCO RLE of every class of a label map, in index order (zero-pixel classes included).

    Args:
        labels: ``[H, W]`` integer class indices in [0, len(class_names)).
        class_names: The C class names.
        compressed: Counts as COCO's compressed string (True) or as a list of ints.

    Returns:
        ``[{"index": k, "name": str, "size": [H, W], "counts": ...}]`` for k in 0..C-1.
    """
    indices = validated_labels(as_numpy(labels), len(class_names), max_classes=None)
    return [
        {"index": k, "name": str(name), **rle_encode(indices == k, compressed=compressed)}
        for k, name in enumerate(class_names)
    ]


def _rle_to_string(counts: Sequence[int]) -> str:
    """COCO's compressed counts string (pycocotools ``rleToString``)."""
    chars: list[str] = []
    for i, count in enumerate(counts):
        value = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            group = value & 0x1F
            value >>= 5  # arithmetic shift: negative deltas end at -1, positive ones at 0
            more = value != -1 if group & 0x10 else value != 0
            if more:
                group |= 0x20
            chars.append(chr(group + 48))
    return "".join(chars)


def _rle_from_string(text: str) -> list[int]:
    """Inverse of :func:`_rle_to_string` (pycocotools ``rleFrString``)."""
    counts: list[int] = []
    position = 0
    while position < len(text):
        value = shift = 0
        more = True
        while more:
            if position >= len(text):
                raise InvalidInputError("truncated RLE counts string")
            group = ord(text[position]) - 48
            value |= (group & 0x1F) << (5 * shift)
            more = bool(group & 0x20)
            position += 1
            shift += 1
            if not more and group & 0x10:
                value |= -1 << (5 * shift)  # sign-extend
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts
