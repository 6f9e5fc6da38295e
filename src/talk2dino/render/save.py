"""Result files on disk: the label PNG, legend, overlay, score archive, pictures and the per-image JSON.

Every file is written atomically (:func:`talk2dino.fileio.atomic_path`): to a temporary file in the destination
folder, then renamed over the destination, so a reader sees either the old file or the complete new one, and a
failed write leaves the old file untouched. :func:`write_result_files` writes one image's files exactly as
``talk2dino segment`` and ``SegmentationResult.save`` do; :func:`result_file_names` is the one place that
names them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from talk2dino.errors import InvalidInputError
from talk2dino.fileio import atomic_path, write_json
from talk2dino.render.arrays import as_numpy
from talk2dino.render.labels import (
    DEFAULT_OVERLAY_ALPHA,
    PICTURE_COMPRESS_LEVEL,
    label_colors,
    label_image,
    legend_image,
    overlay,
)
from talk2dino.render.pictures import DEFAULT_TILE_SIZE, attention_grid, heatmap_grid

if TYPE_CHECKING:
    import torch

__all__ = [
    "result_file_names",
    "save_attention_png",
    "save_heatmaps_png",
    "save_label_png",
    "save_legend_png",
    "save_overlay_png",
    "save_scores_npz",
    "write_result_files",
]

_FLOAT16_MAX = float(np.finfo(np.float16).max)


def write_result_files(out_dir: str | os.PathLike[str], stem: str, image_path: str | os.PathLike[str] | None,
                       rgb: np.ndarray | None, result: Any, summary: dict[str, Any], *, save_scores: bool,
                       overlay: bool, alpha: float, features: Any = None, save_heatmaps: bool = False,
                       save_attention: bool = False) -> dict[str, str]:
    """Write one image's result files, as ``talk2dino segment`` and ``SegmentationResult.save`` do.

    ``<stem>_labels.png`` (palette PNG, pixel = class index), ``<stem>_legend.png``, with `overlay`
    ``<stem>_overlay.png``, with `save_scores` ``<stem>_scores.npz``, with `save_heatmaps` / `save_attention`
    the pictures, and ``<stem>.json`` (`summary` plus each label's RGB colour, the image path and the files).

    Args:
        out_dir: an existing folder.
        stem: the file name stem.
        image_path: recorded in the JSON (None: the image did not come from a file).
        rgb: ``[H, W, 3]`` uint8 image for the overlay (needed when `overlay`).
        result: a `SegmentationResult` (labels ``[H, W]``, scores ``[C, H, W]``, class names, background index).
        summary: its JSON summary (``SegmentationResult.summary()``).
        features: the image's features, for the attention picture.

    Returns:
        The written file names by kind, as listed in the JSON's ``files``.
    """
    out_dir = Path(out_dir)
    labels = result.labels.numpy()
    num = len(result.class_names)
    background = result.background_index
    colors = label_colors(num, background_index=background)
    # Each label's colour in the JSON: the same RGB as the label PNG's palette entry and the overlay.
    summary = {**summary, "labels": [{**entry, "color": [int(c) for c in colors[entry["index"]]]}
                                     for entry in summary["labels"]]}
    files = result_file_names(stem, overlay=overlay, save_scores=save_scores, save_heatmaps=save_heatmaps,
                              save_attention=save_attention and features is not None)
    save_label_png(out_dir / files["labels"], labels, num, background_index=background)
    save_legend_png(out_dir / files["legend"], [entry["name"] for entry in summary["labels"]], colors,
                    shares=[entry["share"] for entry in summary["labels"]])
    if "overlay" in files:
        if rgb is None:
            raise InvalidInputError("an overlay needs the image: pass rgb, or overlay=False")
        save_overlay_png(out_dir / files["overlay"], rgb, labels, num, alpha=alpha, background_index=background)
    if "scores" in files:
        save_scores_npz(out_dir / files["scores"], result.scores, result.class_names)
    if "heatmaps" in files:
        # The stitched maps at the processing size: the same values as the scores before the final resize.
        maps = result.stitched if result.stitched is not None else result.scores
        save_heatmaps_png(out_dir / files["heatmaps"], maps, result.class_names,
                          background_index=result.background_index)
    if "attention" in files:
        save_attention_png(out_dir / files["attention"], features.attention_maps())
    image = None if image_path is None else str(image_path)
    write_json(out_dir / f"{stem}.json", {"image": image, "files": files, **summary})
    return files


def result_file_names(stem: str, *, overlay: bool, save_scores: bool, save_heatmaps: bool,
                      save_attention: bool) -> dict[str, str]:
    """The picture and data files `write_result_files` writes for `stem`, by kind (its JSON, ``<stem>.json``,
    lists them under ``files``): the one place that names them, so a run can check its targets beforehand."""
    kinds = {"labels": "_labels.png", "legend": "_legend.png", "overlay": "_overlay.png" if overlay else "",
             "scores": "_scores.npz" if save_scores else "", "heatmaps": "_heatmaps.png" if save_heatmaps else "",
             "attention": "_attention.png" if save_attention else ""}
    return {kind: stem + suffix for kind, suffix in kinds.items() if suffix}


def save_label_png(
    path: str | os.PathLike[str], labels: np.ndarray, num_classes: int, *, background_index: int | None = None
) -> None:
    """Save a label map as a palette ("P" mode) PNG, atomically; above 256 classes as a 16-bit greyscale PNG.

    Pixel values in the file are the class indices themselves; the PNG palette gives them the colours of
    :func:`label_colors`, so the file is both viewable and machine-readable (``np.array(Image.open(path))``).
    A palette holds 256 colours, so a map of more classes is a 16-bit greyscale PNG of the indices, without
    colours (dark to the eye; the overlay and the legend show the colours).

    Args:
        path: Destination ``.png`` file; its parent folder must exist.
        labels: ``[H, W]`` integer class indices in [0, num_classes).
        num_classes: Number of classes C (score channels, background included), in [1, 65536].
        background_index: Index of the background class (coloured black), or None when there is none.

    Raises:
        InvalidInputError: ``labels`` is not a 2-D integer array, holds values outside [0, num_classes), or
            ``num_classes`` is outside [1, 65536].
    """
    image = label_image(labels, num_classes, background_index=background_index)
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")


def save_legend_png(
    path: str | os.PathLike[str], names: Sequence[str], colors: np.ndarray, *, shares: Sequence[float] | None = None
) -> None:
    """Save :func:`legend_image` as an RGB PNG, atomically.

    Args:
        path: Destination ``.png`` file; its parent folder must exist.
        names: The class names, in index order.
        colors: ``[len(names), 3]`` uint8 RGB colours.
        shares: Optional fraction of the image per class.

    Raises:
        InvalidInputError: As :func:`legend_image`.
    """
    image = legend_image(names, colors, shares=shares)
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")


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
        num_classes: Number of classes C (background included), in [1, 65536].
        alpha: Weight of the class colour, in [0, 1].
        background_index: Class index left uncoloured, or None.

    Raises:
        InvalidInputError: As :func:`overlay`.
    """
    blended = overlay(image, labels, num_classes, alpha=alpha, background_index=background_index)
    with atomic_path(path) as temporary:
        Image.fromarray(blended).save(temporary, format="PNG", compress_level=PICTURE_COMPRESS_LEVEL)


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
    array = as_numpy(scores)
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.floating):
        raise InvalidInputError(f"scores must be a [C, H, W] float array; got shape {array.shape}, dtype {array.dtype}")
    names = [str(name) for name in class_names]
    if array.shape[0] != len(names):
        raise InvalidInputError(f"scores have {array.shape[0]} channels but {len(names)} class names were given")
    # One channel at a time: a mask and a copy of the whole [C, H, W] array cost 9 bytes per value.
    for channel in array:
        finite = channel[np.isfinite(channel)]
        if finite.size and float(np.abs(finite).max()) > _FLOAT16_MAX:
            raise InvalidInputError(f"scores exceed the float16 range (|value| > {_FLOAT16_MAX:g}); save probabilities")
    name_array = np.array(names, dtype=np.str_) if names else np.zeros((0,), dtype="<U1")
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        # A file handle, not a name: np.savez_compressed would append ".npz" to a name lacking it.
        np.savez_compressed(handle, scores=array.astype(np.float16), class_names=name_array)


def save_heatmaps_png(
    path: str | os.PathLike[str],
    scores: np.ndarray | torch.Tensor,
    class_names: Sequence[str],
    *,
    background_index: int | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
    threshold: float | None = None,
) -> None:
    """Save :func:`heatmap_grid` as an RGB PNG, atomically.

    Args:
        path: Destination ``.png`` file; its parent folder must exist.
        scores: ``[C, H, W]`` float per-channel scores.
        class_names: The C channel names.
        background_index: Channel to leave out, or None.
        vmin: Darkest value; None uses the data minimum.
        vmax: Brightest value; None uses the data maximum.
        tile_size: Longer side of each map in pixels.
        threshold: Background threshold θ marked on the colour bar (see :func:`heatmap_grid`).

    Raises:
        InvalidInputError: As :func:`heatmap_grid`.
    """
    grid = heatmap_grid(scores, class_names, background_index=background_index, vmin=vmin, vmax=vmax,
                        tile_size=tile_size, threshold=threshold)
    with atomic_path(path) as temporary:
        Image.fromarray(grid).save(temporary, format="PNG")


def save_attention_png(path: str | os.PathLike[str], attention: np.ndarray | torch.Tensor, *,
                       tile_size: int = DEFAULT_TILE_SIZE) -> None:
    """Save :func:`attention_grid` as an RGB PNG, atomically.

    Args:
        path: Destination ``.png`` file; its parent folder must exist.
        attention: ``[M, H, W]`` float CLS->patch attention per head.
        tile_size: Longer side of each map in pixels.

    Raises:
        InvalidInputError: As :func:`attention_tiles`.
    """
    grid = attention_grid(attention, tile_size=tile_size)
    with atomic_path(path) as temporary:
        Image.fromarray(grid).save(temporary, format="PNG")
