"""Dataset-level mIoU in mmsegmentation's sense, from a confusion matrix (method.md §5.4).

Per image, :meth:`ConfusionMatrix.update` adds the pixel counts of (ground truth, prediction) pairs with one
``torch.bincount`` on the predictions' device; pixels whose ground truth is the ignore index (255) are skipped.
For a batch, :meth:`ConfusionMatrix.image_counts` counts every image of it in one ``bincount`` on the matrix's
device (the model's, in evaluation: the matrix never leaves the GPU while a benchmark runs) and :meth:`add`
accumulates the result, with one host synchronisation per batch for the range check.
Counts are int64, so they are exact for any dataset size. :meth:`ConfusionMatrix.results` then gives, with
mmsegmentation's definitions (``mmseg.core.evaluation.metrics``, 0.x):

- per class c: intersection_c = M[c, c], label area_c = Σ_j M[c, j], prediction area_c = Σ_i M[i, c],
  union_c = area_label + area_pred − intersection;
- IoU_c = intersection_c / union_c, **NaN when union_c = 0** (class absent from both ground truth and
  predictions); a class predicted but absent from the ground truth has IoU 0 and counts;
- Acc_c = intersection_c / label area_c (NaN when the class never occurs in the ground truth);
- mIoU = NaN-aware mean of IoU_c, mAcc likewise, aAcc = Σ intersection / Σ label area (overall pixel accuracy).

Everything is reported × 100, unrounded (tables round mIoU to one decimal, §5.4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from talk2dino.errors import InvalidInputError

__all__ = ["DEFAULT_IGNORE_INDEX", "ConfusionMatrix"]

DEFAULT_IGNORE_INDEX: int = 255
"""Ground-truth value excluded from the metric (method.md §5.1)."""

_PERCENT = 100.0


class ConfusionMatrix:
    """Accumulates a ``[C, C]`` int64 confusion matrix over a dataset: rows ground truth, columns prediction.

    Example::

        matrix = ConfusionMatrix(spec.num_classes, device="cuda")
        for prediction, target in pairs:
            matrix.update(prediction, target)
        matrix.all_reduce()  # no-op unless torch.distributed is initialised
        print(matrix.results()["mIoU"])
    """

    def __init__(
        self, num_classes: int, *, ignore_index: int = DEFAULT_IGNORE_INDEX, device: torch.device | str | None = None
    ) -> None:
        """Args:
            num_classes: Number of classes C (background included on background benchmarks), ≥ 1.
            ignore_index: Ground-truth value that is skipped; must not be a class index (≥ C or negative).
            device: Where the matrix lives and bincount runs. None: on the device of the first update's
                tensors (CPU until then).

        Raises:
            InvalidInputError: ``num_classes`` < 1, or ``ignore_index`` inside ``[0, C)``.
        """
        if num_classes < 1:
            raise InvalidInputError(f"num_classes must be at least 1; got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise InvalidInputError(f"ignore_index {ignore_index} is a class index for {num_classes} classes")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self._follow_inputs = device is None
        self._state = torch.zeros((num_classes, num_classes), dtype=torch.int64,
                                  device=torch.device("cpu") if device is None else torch.device(device))

    @property
    def state(self) -> torch.Tensor:
        """``[C, C]`` int64 pixel counts; ``state[i, j]`` = pixels of ground-truth class i predicted as j."""
        return self._state

    @property
    def device(self) -> torch.device:
        """Device of :attr:`state`."""
        return self._state.device

    def reset(self) -> None:
        """Set every count to zero."""
        self._state.zero_()

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one image (or a batch) to the matrix.

        Args:
            pred: ``[H, W]`` (or any shape equal to ``target``'s) integer predicted labels in ``[0, C)``.
            target: Same shape, integer ground-truth labels in ``[0, C)`` or ``ignore_index``.

        Raises:
            InvalidInputError: Shapes differ, a tensor is not integer, or a value is out of range (predictions
                anywhere; ground truth outside the classes and the ignore index). The message gives the range.
        """
        if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise InvalidInputError("update expects two tensors (use torch.from_numpy for numpy label maps)")
        if pred.shape != target.shape:
            raise InvalidInputError(f"prediction shape {list(pred.shape)} differs from target {list(target.shape)}")
        for tensor, what in ((pred, "prediction"), (target, "target")):
            if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
                raise InvalidInputError(f"{what} must hold integer labels; got dtype {tensor.dtype}")
        if self._follow_inputs:
            if not bool(self._state.any()):
                self._state = self._state.to(pred.device)
            self._follow_inputs = False
        device = self._state.device
        pred = pred.to(device=device, dtype=torch.int64).reshape(-1)
        target = target.to(device=device, dtype=torch.int64).reshape(-1)
        if pred.numel() == 0:
            return
        classes = self.num_classes
        valid = target != self.ignore_index
        bad_target = valid & ((target < 0) | (target >= classes))
        bad_pred = (pred < 0) | (pred >= classes)
        # One host sync for both checks.
        flags = torch.stack([bad_target.any(), bad_pred.any()]).tolist()
        if flags[0]:
            values = torch.unique(target[bad_target])[:10].tolist()
            raise InvalidInputError(
                f"target holds values {values} outside [0, {classes}) that are not the ignore index {self.ignore_index}"
            )
        if flags[1]:
            values = torch.unique(pred[bad_pred])[:10].tolist()
            raise InvalidInputError(f"prediction holds values {values} outside [0, {classes})")
        codes = target[valid] * classes + pred[valid]
        counts = torch.bincount(codes, minlength=classes * classes)
        self._state += counts.reshape(classes, classes)

    def image_counts(self, preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-image confusion counts of a batch, on this matrix's device, without adding them (see `add`).

        All pixels of all B images go through one ``bincount`` (image i's codes offset by i * C * C). Ignored
        pixels and pixels with an out-of-range value go to three extra bins instead of being masked out (a boolean
        mask waits for the device), so the batch costs two host synchronisations (bincount's own size check, and
        reading the two out-of-range counts), none per image.

        Args:
            preds: B ``[H_i, W_i]`` integer predicted labels in ``[0, C)``, on any device.
            targets: B integer ground truths of the same shapes, in ``[0, C)`` or ``ignore_index``.

        Returns:
            ``[B, C, C]`` int64 counts on :attr:`device`; ``[i, g, p]`` = pixels of image i with ground truth g
            predicted as p.

        Raises:
            InvalidInputError: as :meth:`update`: different lengths or shapes, a non-integer tensor, a value out
                of range (the message names the image's position in the batch).
        """
        if len(preds) != len(targets):
            raise InvalidInputError(f"{len(preds)} predictions for {len(targets)} targets")
        classes, device = self.num_classes, self._state.device
        cells = classes * classes
        bad_target_bin, bad_pred_bin, ignored_bin = len(preds) * cells, len(preds) * cells + 1, len(preds) * cells + 2
        codes = []
        for index, (pred, target) in enumerate(zip(preds, targets, strict=True)):
            if pred.shape != target.shape:
                raise InvalidInputError(f"image {index}: prediction shape {list(pred.shape)} differs from target "
                                        f"{list(target.shape)}")
            for tensor, what in ((pred, "prediction"), (target, "target")):
                if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
                    raise InvalidInputError(f"image {index}: {what} must hold integer labels; got {tensor.dtype}")
            # non_blocking: from pinned host memory (the evaluation loader's) the copies overlap the device.
            p = pred.to(device=device, non_blocking=True).reshape(-1).long()
            t = target.to(device=device, non_blocking=True).reshape(-1).long()
            ignored = t == self.ignore_index
            code = torch.where(ignored, ignored_bin, index * cells + t * classes + p)
            code = torch.where(((t < 0) | (t >= classes)) & ~ignored, bad_target_bin, code)
            # Last: a prediction out of range is an error anywhere, ignored pixels included (as in `update`).
            codes.append(torch.where((p < 0) | (p >= classes), bad_pred_bin, code))
        if not codes:
            return torch.zeros((0, classes, classes), dtype=torch.int64, device=device)
        counts = torch.bincount(torch.cat(codes), minlength=ignored_bin + 1)
        bad_target, bad_pred = counts[bad_target_bin:ignored_bin].tolist()
        if bad_target or bad_pred:
            # Rare: find the first offending image with the per-image checks and their messages.
            for index, (pred, target) in enumerate(zip(preds, targets, strict=True)):
                try:
                    ConfusionMatrix(classes, ignore_index=self.ignore_index, device=device).update(pred, target)
                except InvalidInputError as err:
                    raise InvalidInputError(f"image {index}: {err}") from err
        return counts[:bad_target_bin].view(len(preds), classes, classes)

    def add(self, counts: torch.Tensor) -> ConfusionMatrix:
        """Add ``[C, C]`` or ``[B, C, C]`` int64 counts (e.g. from `image_counts`, or a resume cache) on any
        device; returns ``self``. No host synchronisation on the matrix's own device."""
        if counts.shape[-2:] != self._state.shape or counts.dim() not in (2, 3):
            raise InvalidInputError(f"counts of shape {list(counts.shape)} do not fit a {self.num_classes}-class "
                                    "matrix")
        counts = counts.to(self._state.device, non_blocking=True)
        self._state += counts.sum(dim=0) if counts.dim() == 3 else counts
        return self

    def to(self, device: torch.device | str) -> ConfusionMatrix:
        """Move the matrix to `device` (e.g. to the CPU for a gloo all-reduce); returns ``self``."""
        self._state = self._state.to(device)
        self._follow_inputs = False
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts (e.g. from another worker) to this one; returns ``self``.

        Raises:
            InvalidInputError: Different class count or ignore index.
        """
        if other.num_classes != self.num_classes or other.ignore_index != self.ignore_index:
            raise InvalidInputError(
                f"cannot merge a {other.num_classes}-class matrix (ignore {other.ignore_index}) into a "
                f"{self.num_classes}-class one (ignore {self.ignore_index})"
            )
        self._state += other.state.to(self._state.device)
        return self

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the matrix over all processes when ``torch.distributed`` is initialised; returns ``self``.

        Every rank must call it. With the NCCL backend the matrix must live on the rank's GPU.
        """
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self._state, op=dist.ReduceOp.SUM)
        return self

    def results(self) -> dict[str, Any]:
        """The metrics of method.md §5.4 (mmsegmentation's definitions; see the module docstring).

        Returns:
            Plain Python values, percentages unrounded:

            - ``"mIoU"``, ``"mAcc"``, ``"aAcc"``: floats in [0, 100], NaN if undefined (no valid pixel, or no
              class with a defined value);
            - ``"IoU"``, ``"Acc"``: lists of C floats in [0, 100], NaN for undefined classes;
            - ``"num_pixels"``: int, pixels counted (ground truth not ignored).

            NaN is not valid JSON: a record writer should turn it into null.
        """
        matrix = self._state.detach().to("cpu", torch.float64)
        intersection = torch.diagonal(matrix)
        area_label = matrix.sum(dim=1)
        area_pred = matrix.sum(dim=0)
        union = area_label + area_pred - intersection
        nan = torch.tensor(math.nan, dtype=torch.float64)
        iou = torch.where(union > 0, intersection / union.clamp(min=1), nan)
        accuracy = torch.where(area_label > 0, intersection / area_label.clamp(min=1), nan)
        total = float(area_label.sum())
        return {
            "mIoU": _nanmean(iou) * _PERCENT,
            "mAcc": _nanmean(accuracy) * _PERCENT,
            "aAcc": float(intersection.sum()) / total * _PERCENT if total > 0 else math.nan,
            "IoU": [float(value) * _PERCENT for value in iou],
            "Acc": [float(value) * _PERCENT for value in accuracy],
            "num_pixels": int(self._state.sum()),
        }

    def __repr__(self) -> str:
        return (f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
                f"device={self.device}, pixels={int(self._state.sum())})")


def _nanmean(values: torch.Tensor) -> float:
    defined = values[~torch.isnan(values)]
    return float(defined.mean()) if defined.numel() else math.nan
