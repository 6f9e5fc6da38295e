"""`SegmentationResult`: the typed answer for one image, with its JSON summary, overlay and files (house-style §5).

Made by `talk2dino.predictor.Segmenter`; the pictures and files come from `talk2dino.render` (imported on use,
so reading a result's labels and scores never loads the picture code).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from talk2dino.config import InferenceConfig
from talk2dino.data.images import as_rgb_image
from talk2dino.errors import InvalidInputError
from talk2dino.prepare import ImageLike

if TYPE_CHECKING:
    from talk2dino.models import Talk2DINO


class _LazyTensor:
    """Descriptor of a result's tensor that may be computed on first read: a tensor, or a zero-argument function.

    The predictor stores functions for `SegmentationResult.scores` (the final resize of ``stitched``), so that a
    caller who never reads ``scores`` never allocates the full-resolution ``[C, H, W]`` maps, and, for results made
    on a GPU, for ``stitched`` too (its copy to the host), so that only the labels cross to the host unless asked;
    the first read computes and keeps the value. Assigning a tensor (or None, where `optional`) stores it as is.
    """

    optional = False  # whether None is the field's default (otherwise dataclasses treat it as required)

    def __set_name__(self, owner: type, name: str) -> None:
        self._slot = f"_{name}_value"

    def _read(self, obj: Any) -> Any:
        if obj is None:
            if self.optional:
                return None
            raise AttributeError(self._slot)  # no class-level default: a required dataclass field
        value = obj.__dict__[self._slot]
        if callable(value):
            value = value()
            obj.__dict__[self._slot] = value
        return value

    def __set__(self, obj: Any, value: torch.Tensor | Callable[[], torch.Tensor] | None) -> None:
        obj.__dict__[self._slot] = value


class _LazyScores(_LazyTensor):
    """`SegmentationResult.scores`: required."""

    def __get__(self, obj: Any, objtype: type | None = None) -> torch.Tensor:
        return self._read(obj)


class _LazyStitched(_LazyTensor):
    """`SegmentationResult.stitched`: None by default."""

    optional = True

    def __get__(self, obj: Any, objtype: type | None = None) -> torch.Tensor | None:
        return self._read(obj)


@dataclass(init=False)
class SegmentationResult:
    """The answer for one image.

    Attributes:
        labels: ``[H, W]`` int64 label map at the original image size. With a background channel,
            0 is background and n + 1 is ``class_names[n + 1]``; otherwise n is ``class_names[n]``.
        scores: ``[C, H, W]`` float32 stitched per-channel scores resized to the image, before the
            softmax (sigmoid units; channel ``background_index`` is the constant threshold). On CPU they
            are computed from ``stitched`` on first access (the same resize, bit for bit) and then kept;
            a tensor or a zero-argument function returning one may be passed. Results made on a GPU compute
            them on the device and copy them to the host on first access; until then (as for ``stitched``)
            the result holds its stitched maps in device memory, so drop results once used.
        class_names: C names, ``"background"`` first when a background channel is used.
        background_index: 0 with a background channel, else None.
        config: the effective inference settings.
        timings: seconds per stage of this prediction (on the batched path, `Segmenter.predict_features_batch`, only
            with ``profile=True``: the batch's stage seconds, this image's share by windows).
        stitched: ``[C, H', W']`` float32 window average at the resized (processing) size, before the
            final resize (method.md §4.8 step 1); on the host. Results made on a GPU copy it there on first
            access (a tensor or a zero-argument function returning one may be passed, as for ``scores``).
        model_info: ``{"name", "profile", "weights"}`` of the model that made it (set by `Segmenter`;
            None for a result built by hand). Written into :meth:`save`'s JSON.

    Helpers: :meth:`shares` (pixels per class), :meth:`summary` (the CLI's JSON fields), :meth:`overlay`
    (class colours over the image, a PIL image) and :meth:`save` (the CLI's files).
    """

    labels: torch.Tensor
    class_names: list[str]
    background_index: int | None
    config: InferenceConfig
    timings: dict[str, float] = field(default_factory=dict)
    model_info: dict[str, Any] | None = None
    # Last among the fields only so that their descriptors may stand where defaults would; the constructor
    # below keeps the original argument order (labels, scores, class_names, ...).
    scores: _LazyScores = _LazyScores()
    stitched: _LazyStitched = _LazyStitched()

    def __init__(self, labels: torch.Tensor, scores: torch.Tensor | Callable[[], torch.Tensor],
                 class_names: list[str], background_index: int | None, config: InferenceConfig,
                 timings: dict[str, float] | None = None,
                 stitched: torch.Tensor | Callable[[], torch.Tensor] | None = None,
                 model_info: dict[str, Any] | None = None) -> None:
        self.labels = labels
        self.scores = scores
        self.class_names = class_names
        self.background_index = background_index
        self.config = config
        self.timings = {} if timings is None else timings
        self.stitched = stitched
        self.model_info = model_info

    def shares(self) -> list[dict[str, Any]]:
        """Per channel: index, name, pixel count and share of the image (shares sum to 1)."""
        counts = torch.bincount(self.labels.flatten(), minlength=len(self.class_names)).tolist()
        total = max(int(self.labels.numel()), 1)
        return [
            {"index": i, "name": n, "pixels": int(c), "share": round(c / total, 6)}
            for i, (n, c) in enumerate(zip(self.class_names, counts, strict=True))
        ]

    def summary(self) -> dict[str, Any]:
        """JSON-ready description, the fields of the CLI's ``<stem>.json`` after ``image`` and ``files``:
        size, labels with pixel shares, background index, effective settings, model and timings."""
        return {
            "size": list(self.labels.shape),
            "labels": self.shares(),
            "background_index": self.background_index,
            "settings": self.config.effective_dict(),
            "model": self.model_info,
            "timings": {k: round(v, 6) for k, v in self.timings.items()},
        }

    def overlay(self, image: ImageLike, *, alpha: float | None = None) -> Image.Image:
        """The class colours blended over `image`, as the CLI's ``<stem>_overlay.png`` (`render.overlay`).

        Args:
            image: the segmented image, in any form `Segmenter.set_image` accepts (a path included); it
                must have the size of ``labels``.
            alpha: weight of the class colour in [0, 1] (None: `render.DEFAULT_OVERLAY_ALPHA`, the CLI's 0.5).
                Background pixels keep the image's colour.

        Returns:
            An RGB PIL image of the image's size.

        Raises:
            InvalidInputError: an unreadable image, a size other than the labels', alpha outside [0, 1].
        """
        from talk2dino import render

        blended = render.overlay(as_rgb_image(image), self.labels.numpy(), len(self.class_names),
                                 alpha=render.DEFAULT_OVERLAY_ALPHA if alpha is None else alpha,
                                 background_index=self.background_index)
        return Image.fromarray(blended)

    def save(self, directory: str | os.PathLike[str], *, stem: str | None = None, image: ImageLike | None = None,
             alpha: float | None = None, scores: bool = False, heatmaps: bool = False) -> dict[str, Path]:
        """Write the files ``talk2dino segment`` writes for one image, with the CLI's own writer.

        Files in `directory` (created if missing), exactly as the CLI names and writes them:
        ``<stem>_labels.png`` (palette PNG whose pixel values are class indices) and the CLI's other per-image
        pictures, ``<stem>_overlay.png`` when `image` is given, ``<stem>_scores.npz`` with `scores`,
        ``<stem>_heatmaps.png`` with `heatmaps`, and ``<stem>.json``: ``image`` (the path when `image` is one,
        else ``""``), ``files`` (kind -> file name), then :meth:`summary`.

        Args:
            directory: output folder.
            stem: file name stem; None: the stem of `image` when it is a path, else ``"segmentation"``.
            image: the segmented image (any `Segmenter.set_image` form), for the overlay; None: no overlay.
            alpha: overlay colour weight in [0, 1] (None: the CLI's default, 0.5).
            scores: also write the ``[C, H, W]`` scores as float16 ``.npz`` (the CLI's ``--save-scores``).
            heatmaps: also write the per-class score maps picture (the CLI's ``--save-heatmaps``).

        Returns:
            The written paths by kind (``labels``, ``overlay``, ``scores``, ... as listed in the JSON's
            ``files``), plus ``json``.

        Raises:
            InvalidInputError: a stem that is empty or holds a path separator, a bad `image` or `alpha`;
                both are checked before any file is written.
        """
        import json

        from talk2dino import render

        path = image if isinstance(image, (str, os.PathLike)) else None
        if stem is None:
            stem = Path(path).stem if path is not None else "segmentation"
        if not stem or stem in (".", "..") or any(sep in stem for sep in ("/", "\\", os.sep)):
            raise InvalidInputError(f"stem {stem!r} must be a plain file name stem, without a folder")
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise InvalidInputError(f"overlay alpha must be in [0, 1]; got {alpha}")
        rgb = None if image is None else as_rgb_image(image)
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        # The CLI's own writer: the same files, by construction.
        render.write_result_files(out, stem, path, rgb, self, self.summary(),
                       save_scores=scores, overlay=rgb is not None,
                       alpha=render.DEFAULT_OVERLAY_ALPHA if alpha is None else alpha, save_heatmaps=heatmaps)
        json_path = out / f"{stem}.json"
        files = json.loads(json_path.read_text(encoding="utf-8"))["files"]
        return {**{kind: out / name for kind, name in files.items()}, "json": json_path}


def describe_model(model: Talk2DINO) -> dict[str, Any]:
    """The ``model`` entry of a result's summary: ``{"name", "profile", "weights"}``, and for a model whose parts
    were given as sources a ``description`` and the ``parts`` with their sources."""
    info = {"name": model.config.name, "profile": model.config.profile, "weights": model.weights_info}
    overridden = model.weights_info.get("overridden")
    if overridden:
        # `name` stays short ("composed", or the registry name whose parts were replaced); this says which
        # parts the model is made of.
        cfg = model.config
        parts = {"backbone": cfg.backbone.source, "text": cfg.text.source, "projection": cfg.projection.source}
        described = ", ".join(f"{part}={parts[part]}" for part in parts if part in overridden)
        info["description"] = (f"composed: {described}" if cfg.name == "composed"
                               else f"{cfg.name} with {described}")
        info["parts"] = {part: {"source": source, "overridden": part in overridden}
                         for part, source in parts.items()}
    return info
