"""Image geometry of the benchmark protocol: resize rule, sliding-window grid, stitching (method.md §4.3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["resized_size", "stitch", "window_grid"]


def resized_size(height: int, width: int, *, short_side: int, max_long_side: int) -> tuple[int, int]:
    """Size of the aspect-preserving resize: the shorter side becomes ``short_side`` unless the longer
    side would then exceed ``max_long_side``.

    s = min(max_long_side / max(h, w), short_side / min(h, w)) and each side becomes ⌊x·s + 0.5⌋, in
    Python float arithmetic (mmcv ``rescale_size`` semantics). See method.md §4.3 step 2.

    Args:
        height: original image height h in pixels, positive.
        width: original image width w in pixels, positive.
        short_side: target length of the shorter side (method.md §4.3; the default lives in the config).
        max_long_side: cap on the longer side (method.md §4.3; the default lives in the config).

    Returns:
        ``(new_height, new_width)`` in pixels.

    Raises:
        ValueError: if any size is not positive.
    """
    _check_positive("image size", height=height, width=width)
    _check_positive("resize targets", short_side=short_side, max_long_side=max_long_side)
    scale = min(max_long_side / max(height, width), short_side / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _check_positive(what: str, **values: int) -> None:
    """Raise ValueError naming every value when one is not positive."""
    if any(v <= 0 for v in values.values()):
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        raise ValueError(f"{what} must be positive; got {shown}")


def _window_starts(length: int, window: int, stride: int) -> list[tuple[int, int]]:
    count = max(length - window + stride - 1, 0) // stride + 1
    spans = []
    for index in range(count):
        start = index * stride
        end = min(start + window, length)
        start = max(end - window, 0)
        spans.append((start, end))
    return spans


def window_grid(height: int, width: int, *, window: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Sliding-window boxes over a resized image, last windows clamped to the border (no padding).

    n_h = ⌊max(H − window + stride − 1, 0) / stride⌋ + 1 (likewise n_w); for window (i, j):
    y1 = i·stride, y2 = min(y1 + window, H), y1 = max(y2 − window, 0), and the same for x with j.
    See method.md §4.3 step 3.

    Args:
        height: resized image height H in pixels, positive.
        width: resized image width W in pixels, positive.
        window: crop size in pixels (method.md §4.3; the default lives in the config).
        stride: step between windows in pixels (method.md §4.3; the default lives in the config).

    Returns:
        ``(y1, y2, x1, x2)`` per window, half-open pixel ranges, row-major (i outer, j inner). A window
        is smaller than ``window`` in a dimension only when the image is.

    Raises:
        ValueError: if any size is not positive.
    """
    _check_positive("image size", height=height, width=width)
    _check_positive("window and stride", window=window, stride=stride)
    rows = _window_starts(height, window, stride)
    cols = _window_starts(width, window, stride)
    return [(y1, y2, x1, x2) for y1, y2 in rows for x1, x2 in cols]


def stitch(blocks: Tensor, boxes: Sequence[tuple[int, int, int, int]], height: int, width: int) -> Tensor:
    """Average overlapping per-window score blocks into one image-sized map.

    Each block is added into a zero canvas and 1 into a count map over its box; the canvas is then
    divided by the count (plain average). Apply it to the final per-window scores: after sigmoid,
    cleaning, PAMR and the background channel. See method.md §4.3 step 4 and §4.8 step 1.

    Args:
        blocks: `[n_windows, C, wh, ww]` per-window scores, float (float32 in the pipeline), any range;
            all windows of one image have the same size.
        boxes: ``(y1, y2, x1, x2)`` per window, as returned by :func:`window_grid`, in the same order
            as ``blocks``; each box must be ``wh × ww``.
        height: canvas height H in pixels.
        width: canvas width W in pixels.

    Returns:
        `[C, H, W]` averaged scores, in the dtype of ``blocks``.

    Raises:
        ValueError: if the number or size of the boxes disagrees with ``blocks``, a box leaves the
            canvas, or some pixel is covered by no window.
    """
    if blocks.dim() != 4:
        raise ValueError(f"blocks must be [n_windows, C, wh, ww]; got shape {tuple(blocks.shape)}")
    if len(boxes) != blocks.shape[0]:
        raise ValueError(f"got {blocks.shape[0]} blocks but {len(boxes)} boxes; pass one box per window")
    canvas = torch.zeros((blocks.shape[1], height, width), dtype=blocks.dtype, device=blocks.device)
    count = torch.zeros((1, height, width), dtype=blocks.dtype, device=blocks.device)
    for block, (y1, y2, x1, x2) in zip(blocks, boxes, strict=True):
        if not (0 <= y1 < y2 <= height and 0 <= x1 < x2 <= width):
            raise ValueError(f"box {(y1, y2, x1, x2)} lies outside the {height}x{width} canvas")
        if (y2 - y1, x2 - x1) != tuple(block.shape[-2:]):
            raise ValueError(
                f"box {(y1, y2, x1, x2)} is {y2 - y1}x{x2 - x1} but its block is {block.shape[-2]}x{block.shape[-1]}"
            )
        canvas[:, y1:y2, x1:x2] += block
        count[:, y1:y2, x1:x2] += 1
    if bool((count == 0).any()):
        uncovered = int((count == 0).sum())
        raise ValueError(f"{uncovered} pixel(s) of the {height}x{width} canvas are covered by no window")
    return canvas / count
