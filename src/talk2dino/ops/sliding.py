"""Image geometry of the benchmark protocol: resize rule, sliding-window grid, stitching (method.md §4.3)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["TIE_GAP", "device_index", "resized_size", "softmax_argmax", "stitch", "stitch_batch", "window_grid",
           "window_order"]


def resized_size(height: int, width: int, *, short_side: int, max_long_side: int | None = None,
                 rounding: Literal["half_up", "truncate"] = "half_up") -> tuple[int, int]:
    """Size of the aspect-preserving resize: the shorter side becomes ``short_side`` unless the longer
    side would then exceed ``max_long_side``.

    The one resize-size rule of the package, in the two roundings the method uses:

    - ``"half_up"`` (inference, method.md §4.3 step 2): s = min(max_long_side / max(h, w), short_side / min(h, w))
      and each side becomes ⌊x·s + 0.5⌋, in Python float arithmetic (mmcv ``rescale_size`` semantics).
      A side that this rounds to 0 becomes 1 pixel: that happens only above an aspect ratio of
      2·max_long_side (4096:1 with the defaults, e.g. 3×40000), where mmcv's size would be empty and the
      resize impossible. The windows of such an image are stretched to the backbone's square input anyway
      (method.md §4.4 step 2), and the scores are resized back to the original size, so the result is
      still defined. Every other size is the protocol's, bit for bit.
    - ``"truncate"`` (training-time extraction, method.md §3.2): torchvision's ``Resize(short_side)``: the
      shorter side becomes exactly ``short_side`` and the longer ``int(short_side * long / short)`` (float
      division, then truncation towards zero), so 480×640 becomes 448×597 (597.33 truncated). No cap:
      ``max_long_side`` must be None.

    Args:
        height: original image height h in pixels, positive.
        width: original image width w in pixels, positive.
        short_side: target length of the shorter side (method.md §4.3; the default lives in the config).
        max_long_side: cap on the longer side (method.md §4.3; the default lives in the config); None: no cap.
        rounding: ``"half_up"`` or ``"truncate"``, as above.

    Returns:
        ``(new_height, new_width)`` in pixels.

    Raises:
        ValueError: if any size is not positive, or a cap is given with ``"truncate"``.
    """
    _check_positive("image size", height=height, width=width)
    if max_long_side is None:
        _check_positive("resize target", short_side=short_side)
    else:
        _check_positive("resize targets", short_side=short_side, max_long_side=max_long_side)
    if rounding == "truncate":
        if max_long_side is not None:
            raise ValueError("rounding='truncate' (torchvision's Resize) takes no max_long_side")
        if width <= height:
            return int(short_side * height / width), short_side
        return short_side, int(short_side * width / height)
    if rounding != "half_up":
        raise ValueError(f"rounding must be 'half_up' or 'truncate', got {rounding!r}")
    scale = short_side / min(height, width)
    if max_long_side is not None:
        scale = min(max_long_side / max(height, width), scale)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


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


def stitch(blocks: Tensor | Iterable[Tensor], boxes: Sequence[tuple[int, int, int, int]], height: int, width: int,
           *, prepend: float | None = None) -> Tensor:
    """Average overlapping per-window score blocks into one image-sized map.

    Each block is added into a zero canvas and 1 into a count map over its box; the canvas is then
    divided by the count (plain average). Apply it to the final per-window scores: after sigmoid,
    cleaning, PAMR and the background channel. See method.md §4.3 step 4 and §4.8 step 1.

    Args:
        blocks: `[n_windows, C, wh, ww]` per-window scores, float (float32 in the pipeline), any range;
            all windows of one image have the same size. Or an iterable of n_windows `[C, wh, ww]` blocks
            (e.g. a generator refining one window at a time), each added as soon as it is produced.
        boxes: ``(y1, y2, x1, x2)`` per window, as returned by :func:`window_grid`, in the same order
            as ``blocks``; each box must be ``wh × ww``.
        height: canvas height H in pixels.
        width: canvas width W in pixels.
        prepend: if given, a constant channel of this value in front of every block (the background
            channel of method.md §4.6), averaged like the others: the same result as stitching blocks
            with that channel concatenated, without building them.

    Returns:
        `[C, H, W]` averaged scores (`[C + 1, H, W]` with ``prepend``), in the dtype of the blocks.

    Raises:
        ValueError: if the number or size of the boxes disagrees with ``blocks``, a box leaves the
            canvas, or some pixel is covered by no window.
    """
    if isinstance(blocks, Tensor):
        if blocks.dim() != 4:
            raise ValueError(f"blocks must be [n_windows, C, wh, ww]; got shape {tuple(blocks.shape)}")
        if len(boxes) != blocks.shape[0]:
            raise ValueError(f"got {blocks.shape[0]} blocks but {len(boxes)} boxes; pass one box per window")
    extra = 0 if prepend is None else 1
    canvas: Tensor | None = None
    count: Tensor | None = None
    used = 0
    for block in blocks:
        if used == len(boxes):
            raise ValueError(f"got more blocks than the {len(boxes)} boxes; pass one box per window")
        if block.dim() != 3:
            raise ValueError(f"each block must be [C, wh, ww]; got shape {tuple(block.shape)}")
        y1, y2, x1, x2 = boxes[used]
        used += 1
        if canvas is None or count is None:
            canvas = torch.zeros((block.shape[0] + extra, height, width), dtype=block.dtype, device=block.device)
            count = torch.zeros((1, height, width), dtype=block.dtype, device=block.device)
        if not (0 <= y1 < y2 <= height and 0 <= x1 < x2 <= width):
            raise ValueError(f"box {(y1, y2, x1, x2)} lies outside the {height}x{width} canvas")
        if (y2 - y1, x2 - x1) != tuple(block.shape[-2:]):
            raise ValueError(
                f"box {(y1, y2, x1, x2)} is {y2 - y1}x{x2 - x1} but its block is {block.shape[-2]}x{block.shape[-1]}"
            )
        if prepend is not None:
            canvas[0, y1:y2, x1:x2] += prepend
        canvas[extra:, y1:y2, x1:x2] += block
        count[:, y1:y2, x1:x2] += 1
    if used != len(boxes) or canvas is None or count is None:
        raise ValueError(f"got {used} blocks but {len(boxes)} boxes; pass one box per window")
    if bool((count == 0).any()):
        uncovered = int((count == 0).sum())
        raise ValueError(f"{uncovered} pixel(s) of the {height}x{width} canvas are covered by no window")
    return canvas.div_(count)


def window_order(counts: Sequence[int]) -> list[tuple[int, int]]:
    """Slot-major order of the windows of several images: ``(image, window)`` pairs.

    Slot k holds the k-th window of every image that has more than k (images in order), so every slot sends
    at most one window to each image: :func:`stitch_batch` adds a whole slot at once without two writes to one
    pixel, and still adds each image's windows in their own order (the sums of :func:`stitch`, bit for bit).
    """
    return [(image, k) for k in range(max(counts, default=0)) for image, n in enumerate(counts) if k < n]


def device_index(rows: Sequence[Sequence[int]], device: torch.device) -> Tensor:
    """``[len(rows), n]`` int64 tensor of host integers on `device`, without waiting for the device.

    On CUDA the values go through page-locked memory with a non-blocking copy, which queues behind the work
    already submitted instead of synchronising with it (a plain ``torch.tensor(..., device=...)`` waits).
    """
    table = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), -1)
    if device.type != "cuda":
        return table.to(device)
    return table.pin_memory().to(device, non_blocking=True)


def stitch_batch(blocks: Tensor, boxes: Sequence[Sequence[tuple[int, int, int, int]]],
                 sizes: Sequence[tuple[int, int]], *, prepend: float | None = None) -> Tensor:
    """:func:`stitch` for several images at once: the same averages, bit for bit, as batched tensor operations.

    The canvas of every image lives in one zero-padded, channels-last tensor. For each slot of
    :func:`window_order` (the k-th window of every image), one gather-add-scatter (``index_put_``) adds the
    slot's windows into their images' canvases and one more counts them (and sums the background constant):
    the Python loop runs over slots (the largest window count of one image), never over windows, and nothing
    waits for the device. Each image's sums are those of :func:`stitch` (its windows added to zero in their
    order, the count likewise), divided once.

    Args:
        blocks: ``[n, C, wh, ww]`` per-window scores of all images, in :func:`window_order` order, any layout
            (e.g. the channels-last output of PAMR).
        boxes: per image, its windows' ``(y1, y2, x1, x2)`` in order, each ``wh × ww``, covering the image
            (as :func:`window_grid` makes them; coverage is not checked, an uncovered pixel would be 0).
        sizes: per image, its canvas ``(H, W)``.
        prepend: as in :func:`stitch`, a constant channel in front of every block (the background).

    Returns:
        ``[B, C(+1), H_max, W_max]``, a channels-last view: image b's map is ``[b, :, :H_b, :W_b]`` (the
        padding is 0), in the dtype of the blocks.

    Raises:
        ValueError: if the numbers of windows or images disagree, or a box has the wrong size or leaves its canvas.
    """
    counts = [len(image_boxes) for image_boxes in boxes]
    if blocks.dim() != 4 or blocks.shape[0] != sum(counts) or len(sizes) != len(boxes):
        raise ValueError(f"expected [n, C, wh, ww] blocks for the {sum(counts)} boxes of {len(boxes)} images "
                         f"({len(sizes)} sizes); got shape {tuple(blocks.shape)}")
    wh, ww = int(blocks.shape[-2]), int(blocks.shape[-1])
    order = window_order(counts)
    for image, k in order:
        y1, y2, x1, x2 = boxes[image][k]
        height, width = sizes[image]
        if (y2 - y1, x2 - x1) != (wh, ww) or not (0 <= y1 and y2 <= height and 0 <= x1 and x2 <= width):
            raise ValueError(f"box {(y1, y2, x1, x2)} of image {image} is not a {wh}x{ww} window inside its "
                             f"{height}x{width} canvas")
    device, extra = blocks.device, 0 if prepend is None else 1
    table = device_index([[image for image, _ in order], [boxes[i][k][0] for i, k in order],
                          [boxes[i][k][2] for i, k in order]], device)
    shape = (len(boxes), max(h for h, _ in sizes), max(w for _, w in sizes))
    canvas = torch.zeros((*shape, blocks.shape[1] + extra), dtype=blocks.dtype, device=device)
    # Per pixel: the window count and, with `prepend`, the sum of the constant, accumulated like the blocks.
    counted = torch.zeros((*shape, 1 + extra), dtype=blocks.dtype, device=device)
    step = torch.ones(1 + extra, dtype=blocks.dtype, device=device)
    if prepend is not None:
        step[1] = prepend  # a fill, not a copy from the host
    values, target = blocks.permute(0, 2, 3, 1), canvas[..., extra:]
    rows = torch.arange(wh, device=device).view(1, wh, 1)
    cols = torch.arange(ww, device=device).view(1, 1, ww)
    start = 0
    for slot in range(max(counts, default=0)):
        size = sum(1 for n in counts if n > slot)
        part = slice(start, start + size)
        # [size, wh, ww] broadcast indices: image, row, column of every pixel of the slot's windows.
        index = (table[0, part].view(-1, 1, 1), table[1, part].view(-1, 1, 1) + rows,
                 table[2, part].view(-1, 1, 1) + cols)
        # Read, add, write back: no pixel is written twice within a slot, so no atomics and no sort are needed
        # and the order of the additions is each image's own.
        target.index_put_(index, target[index] + values[part])
        counted.index_put_(index, counted[index] + step)
        start += size
    if prepend is not None:
        canvas[..., 0] = counted[..., 1]
    # The padding has no window: divided by 1 it stays 0.
    return canvas.div_(counted[..., :1].clamp_min(1)).permute(0, 3, 1, 2)


# Relative gap below which two channels of one pixel count as a possible softmax tie in `softmax_argmax`.
TIE_GAP = 1e-5
_ARGMAX_ROWS = 64  # rows per chunk in `softmax_argmax`: keeps the temporaries small and in cache


def softmax_argmax(scores: Tensor) -> Tensor:
    """Labels of method.md §4.8 step 4, ``softmax(scores, dim=0).argmax(dim=0)``, without the full softmax.

    The fp32 softmax over channels can turn scores that differ by an ulp or so into exact ties, which
    argmax resolves to the lowest index; that is the behaviour to keep. It never reorders channels:
    per pixel it computes exp(x_c − m) / Σ with one m and one Σ, and both steps are monotone
    non-decreasing in float arithmetic. So where the best channel beats every other by a relative gap
    of at least ``TIE_GAP`` (1e-5, far above the few-ulp rounding of exp and of the division), the
    softmax argmax is the plain argmax. Only the remaining pixels (near-ties, exact ties, NaN) go
    through the softmax, gathered into one small ``[C, n]`` tensor. Rows are processed in chunks.

    Args:
        scores: ``[C, H, W]`` float scores (the resized stitched scores of §4.8 step 3).

    Returns:
        ``[H, W]`` int64 labels, equal to ``torch.softmax(scores, 0).argmax(0)``.

    Raises:
        ValueError: if ``scores`` is not 3-d with at least one channel.
    """
    if scores.dim() != 3 or scores.shape[0] == 0:
        raise ValueError(f"scores must be [C, H, W] with C >= 1; got shape {tuple(scores.shape)}")
    height, width = scores.shape[1:]
    labels = torch.empty((height, width), dtype=torch.int64, device=scores.device)
    for top in range(0, height, _ARGMAX_ROWS):
        chunk = scores[:, top : top + _ARGMAX_ROWS]
        best, index = chunk.max(dim=0)  # first index among exact maxima, like argmax
        floor = best - TIE_GAP * (1 + best.abs())
        # Channels within the gap of the best, the best included; NaN compares false, hence `isnan`.
        ambiguous = ((chunk >= floor).sum(dim=0) > 1) | torch.isnan(best)
        if bool(ambiguous.any()):
            index[ambiguous] = torch.softmax(chunk[:, ambiguous], dim=0).argmax(dim=0)
        labels[top : top + _ARGMAX_ROWS] = index
    return labels
