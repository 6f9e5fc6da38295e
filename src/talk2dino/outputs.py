"""Writers for segmentation outputs, shared by the CLI, the HTTP server and its web page.

This module is the one implementation of the label colours (:func:`palette`), the overlay (:func:`overlay`), the
palette PNG label map, the score and attention colour map (:func:`colormap`), the picture grids and COCO RLE. The
server encodes the same images to bytes (:func:`png_bytes`, :func:`label_png_bytes`) instead of files, and its web
page only displays what the server drew, so the three can never disagree.

Every file is written atomically: to a temporary file in the destination folder, then renamed over the
destination with :func:`os.replace`. A reader therefore sees either the old file or the complete new one, and
a failed write leaves the old file untouched.

Label colours follow the PASCAL VOC colour map (:func:`palette`), whose colour 0 is black. Black means "no
label", so only a background class gets it: :func:`label_colors` gives real labels the VOC colours from 1 on
(without a background class, label ``k`` gets VOC colour ``k + 1``). Label maps keep the class indices as pixel
values either way; only their palette follows :func:`label_colors`.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from talk2dino.errors import InvalidInputError
from talk2dino.fileio import atomic_path, atomic_write_bytes  # re-exported: the one atomic-write implementation

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_TILE_SIZE",
    "LEGEND_ROW_HEIGHT",
    "MAX_LABEL_CLASSES",
    "MAX_PALETTE_COLORS",
    "OVERLAY_CHUNK_PIXELS",
    "atomic_path",
    "atomic_write_bytes",
    "attention_grid",
    "attention_tiles",
    "colormap",
    "heatmap_grid",
    "heatmap_tiles",
    "image_grid",
    "label_colors",
    "label_image",
    "legend_image",
    "label_png_bytes",
    "label_rles",
    "overlay",
    "palette",
    "png_bytes",
    "rle_decode",
    "rle_encode",
    "save_attention_png",
    "save_heatmaps_png",
    "save_json",
    "save_label_png",
    "save_legend_png",
    "save_overlay_png",
    "save_scores_npz",
    "result_file_names",
    "summarize",
    "write_result_files",
]

logger = logging.getLogger(__name__)

MAX_PALETTE_COLORS: int = 256
"""A palette PNG stores at most 256 colours: label maps of up to 256 classes (indices 0-255) are palette PNGs."""

MAX_LABEL_CLASSES: int = 65536
"""Most classes a label map may hold: above :data:`MAX_PALETTE_COLORS` it is a 16-bit greyscale PNG (indices
0-65535, no palette), and the overlay and legend take the colours from :func:`label_colors`, which go on past 256."""

OVERLAY_CHUNK_PIXELS: int = 1 << 20
"""Pixels blended at a time by :func:`overlay`: its float64 arithmetic costs ~100 bytes a pixel, so a
150-megapixel image blended at once needed 15 GB; in bands of rows it needs a few hundred MB at most."""

DEFAULT_OVERLAY_ALPHA: float = 0.5
"""Weight of the class colour in :func:`overlay`; the image gets ``1 - alpha``."""

DEFAULT_TILE_SIZE: int = 256
"""Longer side, in pixels, of each map in the heat-map and attention grids."""

# Eleven evenly spaced colours of matplotlib's "viridis" (perceptually uniform, readable in greyscale and by
# colour-blind viewers); :func:`colormap` interpolates linearly between them, so no plotting library is needed.
_VIRIDIS_ANCHORS = np.array(
    [
        (68, 1, 84), (72, 37, 118), (65, 68, 135), (53, 96, 141), (42, 120, 142), (33, 144, 140),
        (34, 168, 132), (67, 191, 113), (122, 209, 81), (187, 223, 39), (253, 231, 37),
    ],
    dtype=np.float64,
)
_CAPTION_HEIGHT = 16  # pixels of the text strip above each grid tile (the default font is about 10 px tall)
_GRID_GAP = 4  # pixels between grid tiles
_GRID_BACKGROUND = (255, 255, 255)
_GRID_TEXT = (0, 0, 0)
_COLORBAR_HEIGHT = 12
TILE_STRETCH = 4
"""Heat-map / attention tiles keep a shorter side of at least ``tile_size / TILE_STRETCH`` pixels (panoramas get
a longer side of up to ``TILE_STRETCH · tile_size`` instead of a sliver)."""

LEGEND_ROW_HEIGHT = 20
"""Pixels per class row in :func:`legend_image`."""
LEGEND_SWATCH = 14
"""Side of each colour swatch in :func:`legend_image`, in pixels."""
LEGEND_PADDING = 6
"""Margin around the legend and between swatch and name, in pixels."""
LEGEND_MAX_TEXT_WIDTH = 400
"""Longer names are cut with "..." (pixels)."""

_FLOAT16_MAX = float(np.finfo(np.float16).max)
_SHARE_DECIMALS = 6
_BACKGROUND_NAME = "background"

# zlib level of photo-like PNGs (overlays, pictures sent by the server): made per image, and level 6 (Pillow's
# default) costs ~5x the time of level 1 (89 vs 16 ms for a 500x375 overlay) for ~15% fewer bytes. Label
# maps keep the default: they are flat and tiny, and compress in well under a millisecond either way.
PICTURE_COMPRESS_LEVEL = 1


def palette(num_colors: int) -> np.ndarray:
    """Deterministic, distinct label colours: the PASCAL VOC colour map.

    Colour ``k`` spreads the bits of ``k`` over the high bits of the three channels (bit 0 -> red, bit 1 ->
    green, bit 2 -> blue, then the next bit plane one position lower), so index 0 is black, 1 is (128, 0, 0),
    2 is (0, 128, 0), 3 is (128, 128, 0) and all 256 colours are distinct. This is the raw colour map; label
    maps are coloured with :func:`label_colors`, which keeps black for a background class only.

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
        colors[index] = _voc_color(index)
    return colors


def _voc_color(index: int) -> tuple[int, int, int]:
    """Colour ``index`` of the PASCAL VOC colour map (any index >= 0; distinct for indices below 2**24)."""
    code = index
    red = green = blue = 0
    for bit_plane in range(8):
        red |= ((code >> 0) & 1) << (7 - bit_plane)
        green |= ((code >> 1) & 1) << (7 - bit_plane)
        blue |= ((code >> 2) & 1) << (7 - bit_plane)
        code >>= 3
    return red, green, blue


def label_colors(num_classes: int, *, background_index: int | None = None) -> np.ndarray:
    """The colour of each class of a label map: black for the background class only.

    The background class (if any) gets VOC colour 0 (black); the real labels, in index order, get the VOC
    colours 1, 2, 3, ... So without a background class label ``k`` gets ``palette`` colour ``k + 1`` and no
    real label is ever black; with the background at index 0 this is exactly :func:`palette`. The label PNG's
    palette, the overlay, the server's ``color`` fields and the CLI's JSON all use these colours.

    Past 256 classes the colours continue the VOC colour map (distinct up to 2**24), for the overlay and the
    legend of 16-bit label maps.

    Args:
        num_classes: Number of classes C (background included), in [0, :data:`MAX_LABEL_CLASSES`].
        background_index: Index of the background class, or None when every class is a real label.

    Returns:
        ``[num_classes, 3]`` uint8, RGB.

    Raises:
        InvalidInputError: ``num_classes`` outside [0, 65536] or ``background_index`` outside [0, num_classes).
    """
    if not 0 <= num_classes <= MAX_LABEL_CLASSES:
        raise InvalidInputError(
            f"label colours exist for 0 to {MAX_LABEL_CLASSES} classes (a 16-bit label map's limit); got {num_classes}"
        )
    if background_index is not None and not 0 <= background_index < num_classes:
        raise InvalidInputError(f"background_index must be in [0, {num_classes}); got {background_index}")
    colors = np.zeros((num_classes, 3), dtype=np.uint8)
    for index in range(num_classes):
        if index == background_index:
            continue  # black
        shifted = index + 1 if background_index is None or index < background_index else index
        colors[index] = _voc_color(shifted)
    return colors


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


def label_image(labels: np.ndarray, num_classes: int, *, background_index: int | None = None) -> Image.Image:
    """The palette ("P" mode) image behind :func:`save_label_png`: pixel values are class indices.

    Args:
        labels: ``[H, W]`` integer class indices in [0, num_classes).
        num_classes: Number of classes C (background included), in [1, 65536].
        background_index: Index of the background class, or None when there is none.

    Returns:
        A "P" mode PIL image whose palette is :func:`label_colors` ``(num_classes, background_index=...)``;
        above 256 classes an "I;16" image of the indices (16-bit greyscale, no palette).

    Raises:
        InvalidInputError: As :func:`save_label_png`.
    """
    if num_classes > MAX_PALETTE_COLORS:
        wide = _validated_labels(labels, num_classes, max_classes=MAX_LABEL_CLASSES)
        return Image.fromarray(wide.astype(np.uint16))  # mode "I;16": saved as a 16-bit greyscale PNG
    indices = _validated_labels(labels, num_classes)
    image = Image.fromarray(indices)  # mode "L"; putpalette turns it into "P"
    image.putpalette(label_colors(num_classes, background_index=background_index).tobytes())
    return image


def label_png_bytes(labels: np.ndarray, num_classes: int, *, background_index: int | None = None) -> bytes:
    """:func:`save_label_png` to bytes instead of a file (the server's ``label_png``).

    Args:
        labels: ``[H, W]`` integer class indices in [0, num_classes).
        num_classes: Number of classes C (background included), in [1, 256].
        background_index: Index of the background class, or None when there is none.

    Returns:
        The PNG file content.
    """
    return png_bytes(label_image(labels, num_classes, background_index=background_index))


def legend_image(names: Sequence[str], colors: np.ndarray, *, shares: Sequence[float] | None = None) -> Image.Image:
    """A legend: one row per class, top to bottom in index order, a colour swatch then the class name.

    Row ``k`` spans pixels ``[LEGEND_PADDING + k * LEGEND_ROW_HEIGHT, ... + LEGEND_ROW_HEIGHT)``; its swatch is
    filled with ``colors[k]`` inside a grey outline (so that a white or black swatch still shows). Names are
    drawn in a font that has their characters (else ``\\uXXXX`` escapes, never boxes) and cut with "..." past
    :data:`LEGEND_MAX_TEXT_WIDTH` pixels.

    Args:
        names: The class names, in index order.
        colors: ``[len(names), 3]`` uint8 RGB colours, e.g. :func:`label_colors`.
        shares: Optional fraction of the image per class, written after the name as a percentage.

    Returns:
        An RGB PIL image on a white background.

    Raises:
        InvalidInputError: ``colors`` or ``shares`` do not match ``names``.
    """
    rgb = np.asarray(colors)
    if rgb.ndim != 2 or rgb.shape != (len(names), 3):
        raise InvalidInputError(f"legend colours must be [{len(names)}, 3]; got shape {rgb.shape}")
    if shares is not None and len(shares) != len(names):
        raise InvalidInputError(f"legend got {len(shares)} shares for {len(names)} names")
    texts = [str(name) if shares is None else f"{name}  {100 * float(shares[k]):.1f}%" for k, name in enumerate(names)]
    # Each row in a font that has its characters (the captions' choice: non-Latin names are never boxes).
    rows = [_caption_font(text) for text in texts]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = min(LEGEND_MAX_TEXT_WIDTH,
                     max([int(measure.textlength(t, font=f)) + 1 for f, t in rows] + [60]))
    text_left = LEGEND_PADDING + LEGEND_SWATCH + LEGEND_PADDING
    width = text_left + text_width + LEGEND_PADDING
    height = 2 * LEGEND_PADDING + LEGEND_ROW_HEIGHT * len(names)
    canvas = Image.new("RGB", (width, height), _GRID_BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    inset = (LEGEND_ROW_HEIGHT - LEGEND_SWATCH) // 2
    for k, (font, text) in enumerate(rows):
        top = LEGEND_PADDING + k * LEGEND_ROW_HEIGHT
        box = (LEGEND_PADDING, top + inset, LEGEND_PADDING + LEGEND_SWATCH - 1, top + inset + LEGEND_SWATCH - 1)
        draw.rectangle(box, fill=tuple(int(c) for c in rgb[k]), outline=(128, 128, 128))
        draw.text((text_left, top + LEGEND_ROW_HEIGHT // 2), _fit_text(draw, text, font, text_width),
                  fill=_GRID_TEXT, font=font, anchor="lm")
    return canvas


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


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    """Encode an image as PNG bytes.

    Args:
        image: A PIL image, or a ``[H, W, 3]`` uint8 RGB / ``[H, W]`` uint8 grey array.

    Returns:
        The PNG file content.
    """
    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.ascontiguousarray(image))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=PICTURE_COMPRESS_LEVEL)
    return buffer.getvalue()


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    alpha: float = DEFAULT_OVERLAY_ALPHA,
    background_index: int | None = None,
) -> np.ndarray:
    """Blend class colours over an image.

    Each pixel becomes ``floor((1 - alpha) * image + alpha * colors[label] + 0.5)`` with ``colors =
    label_colors(num_classes, background_index=background_index)`` (rounded to the nearest integer, halves
    up); pixels labelled ``background_index`` keep the image's value exactly.

    Args:
        image: ``[H, W, 3]`` uint8, RGB, values in [0, 255].
        labels: ``[H, W]`` integer class indices in [0, num_classes), same H and W as ``image``.
        num_classes: Number of classes C (background included), in [1, 65536].
        alpha: Weight of the class colour, in [0, 1].
        background_index: Class index left uncoloured, or None to colour every class (none of them black).

    Returns:
        ``[H, W, 3]`` uint8, RGB, a new array.

    Raises:
        InvalidInputError: Bad shapes, dtypes, label values, ``alpha`` or ``background_index``.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        described = f"shape {getattr(image, 'shape', None)}, dtype {getattr(image, 'dtype', type(image).__name__)}"
        raise InvalidInputError(f"overlay expects a uint8 HxWx3 RGB image; got {described}")
    indices = _validated_labels(labels, num_classes, max_classes=MAX_LABEL_CLASSES)
    if indices.shape != image.shape[:2]:
        raise InvalidInputError(
            f"labels shape {indices.shape} does not match image shape {image.shape[:2]}; resize one to the other"
        )
    if not 0.0 <= alpha <= 1.0:
        raise InvalidInputError(f"overlay alpha must be in [0, 1]; got {alpha}")
    if background_index is not None and not 0 <= background_index < num_classes:
        raise InvalidInputError(f"background_index must be in [0, {num_classes}); got {background_index}")
    table = label_colors(num_classes, background_index=background_index).astype(np.float64)
    result = np.empty_like(image)
    # In bands of rows: the float64 temporaries of one band are ~100 bytes a pixel (see OVERLAY_CHUNK_PIXELS);
    # each pixel's arithmetic is the same as for the whole image at once.
    rows = max(1, OVERLAY_CHUNK_PIXELS // max(1, image.shape[1]))
    for top in range(0, image.shape[0], rows):
        band = slice(top, top + rows)
        colors = table[indices[band]]
        blended = np.floor((1.0 - alpha) * image[band].astype(np.float64) + alpha * colors + 0.5)
        result[band] = np.clip(blended, 0, 255).astype(np.uint8)
        if background_index is not None:
            keep = indices[band] == background_index
            result[band][keep] = image[band][keep]
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
    array = _to_numpy(scores)
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
# Pictures: colour map, grids of score maps and attention heads
# --------------------------------------------------------------------------------------------------------------


def colormap(values: np.ndarray | torch.Tensor, *, vmin: float, vmax: float) -> np.ndarray:
    """Colour scalar values with a viridis-like map (dark purple = ``vmin``, yellow = ``vmax``).

    Values are clipped to [vmin, vmax] and mapped linearly; NaN becomes the ``vmin`` colour. When
    ``vmax <= vmin`` every value gets the ``vmin`` colour (a constant map carries no information).

    Args:
        values: ``[...]`` real values, any shape (e.g. ``[H, W]`` scores).
        vmin: Value shown with the first colour.
        vmax: Value shown with the last colour.

    Returns:
        ``[..., 3]`` uint8, RGB.
    """
    array = _to_numpy(values).astype(np.float64)
    span = vmax - vmin
    if not np.isfinite(span) or span <= 0:
        position = np.zeros_like(array)
    else:
        position = np.clip((np.nan_to_num(array, nan=vmin) - vmin) / span, 0.0, 1.0)
    scaled = position * (len(_VIRIDIS_ANCHORS) - 1)
    low = np.minimum(np.floor(scaled).astype(np.int64), len(_VIRIDIS_ANCHORS) - 2)
    frac = (scaled - low)[..., None]
    colors = _VIRIDIS_ANCHORS[low] * (1.0 - frac) + _VIRIDIS_ANCHORS[low + 1] * frac
    return np.clip(np.floor(colors + 0.5), 0, 255).astype(np.uint8)


def image_grid(tiles: Sequence[np.ndarray], captions: Sequence[str], *, columns: int | None = None) -> np.ndarray:
    """Lay out RGB tiles in rows, each under a one-line caption, on a white canvas.

    Captions are drawn with the first caption font that has a glyph for every character (DejaVu Sans, CJK
    fonts when installed, Pillow's own FreeType font; see :func:`_caption_font`); characters no font has
    are written as ``\\uXXXX`` escapes rather than as empty boxes. Captions are cut (with "...") to the
    tile width. With ``columns=None`` tiles more than twice as wide as tall (panoramas) are stacked into
    fewer columns so that the grid stays near square.

    Args:
        tiles: ``[h_i, w_i, 3]`` uint8 RGB images, any sizes; each cell is as large as the largest tile.
        captions: One caption per tile.
        columns: Tiles per row; None picks ``ceil(sqrt(n))``.

    Returns:
        ``[H, W, 3]`` uint8 RGB grid.

    Raises:
        InvalidInputError: No tiles, a caption count that differs from the tile count, or a non-RGB tile.
    """
    if not tiles:
        raise InvalidInputError("image_grid needs at least one tile")
    if len(captions) != len(tiles):
        raise InvalidInputError(f"got {len(tiles)} tiles but {len(captions)} captions")
    for tile in tiles:
        if tile.dtype != np.uint8 or tile.ndim != 3 or tile.shape[2] != 3:
            raise InvalidInputError(f"grid tiles must be uint8 HxWx3 RGB; got shape {tile.shape}, dtype {tile.dtype}")
    count = len(tiles)
    cell_h = max(t.shape[0] for t in tiles) + _CAPTION_HEIGHT
    cell_w = max(t.shape[1] for t in tiles)
    if columns is not None:
        cols = columns
    elif cell_w > 2 * cell_h:  # wide tiles (panoramas): stack them so that the grid is near square in pixels
        cols = int(np.ceil(np.sqrt(count * cell_h / cell_w)))
    else:
        cols = int(np.ceil(np.sqrt(count)))
    cols = max(1, min(cols, count))
    rows = int(np.ceil(count / cols))
    height = rows * cell_h + (rows + 1) * _GRID_GAP
    width = cols * cell_w + (cols + 1) * _GRID_GAP
    canvas = Image.new("RGB", (width, height), _GRID_BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for index, (tile, caption) in enumerate(zip(tiles, captions, strict=True)):
        row, col = divmod(index, cols)
        left = _GRID_GAP + col * (cell_w + _GRID_GAP)
        top = _GRID_GAP + row * (cell_h + _GRID_GAP)
        font, text = _caption_font(caption)
        draw.text((left, top + 1), _fit_text(draw, text, font, cell_w), fill=_GRID_TEXT, font=font)
        canvas.paste(Image.fromarray(tile), (left, top + _CAPTION_HEIGHT))
    return np.asarray(canvas, dtype=np.uint8).copy()


def heatmap_tiles(
    scores: np.ndarray | torch.Tensor,
    class_names: Sequence[str],
    *,
    background_index: int | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> tuple[list[tuple[int, np.ndarray]], tuple[float, float]]:
    """Colour every label's score map under one shared scale (the background channel is left out).

    One shared scale makes the maps comparable: a label that scores low everywhere stays dark instead of being
    stretched to full contrast.

    Args:
        scores: ``[C, H, W]`` float per-channel scores (e.g. ``SegmentationResult.stitched`` or ``.scores``:
            sigmoid cosine scores in (0, 1), before the softmax).
        class_names: The C channel names.
        background_index: Channel to leave out (a constant threshold), or None.
        vmin: Value of the darkest colour; None uses the minimum over the shown channels.
        vmax: Value of the brightest colour; None uses the maximum over the shown channels.
        tile_size: Longer side of each map in pixels (resized bilinearly, aspect kept); raised for very
            elongated maps so that the shorter side is at least ``tile_size / TILE_STRETCH`` (the longer
            side at most ``TILE_STRETCH · tile_size``).

    Returns:
        ``[(channel index, [h, w, 3] uint8 RGB tile)]`` in channel order, and the ``(vmin, vmax)`` used.

    Raises:
        InvalidInputError: ``scores`` is not ``[C, H, W]``, C differs from ``len(class_names)``, or no channel is
            left to show.
    """
    maps = _to_numpy(scores).astype(np.float32)
    if maps.ndim != 3:
        raise InvalidInputError(f"scores must be [C, H, W]; got shape {maps.shape}")
    if maps.shape[0] != len(class_names):
        raise InvalidInputError(f"scores have {maps.shape[0]} channels but {len(class_names)} class names were given")
    keep = [i for i in range(maps.shape[0]) if i != background_index]
    if not keep:
        raise InvalidInputError("no label channel to draw (only the background channel was given)")
    low = float(np.nanmin(maps[keep])) if vmin is None else float(vmin)
    high = float(np.nanmax(maps[keep])) if vmax is None else float(vmax)
    long_side = _tile_long_side(maps.shape[1:], tile_size)
    return [(i, colormap(_resize_map(maps[i], long_side), vmin=low, vmax=high)) for i in keep], (low, high)


def heatmap_grid(
    scores: np.ndarray | torch.Tensor,
    class_names: Sequence[str],
    *,
    background_index: int | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
    columns: int | None = None,
    threshold: float | None = None,
) -> np.ndarray:
    """A grid of per-label score maps (:func:`heatmap_tiles`) captioned with the labels, with a colour bar.

    When a background threshold θ applies it is marked on the colour bar (a line at θ, labelled "θ=…"; a
    θ outside the bar's range is drawn at the nearer end, labelled with "<" or ">"): pixels whose every
    label is darker than the mark go to the background.

    Args:
        scores: ``[C, H, W]`` float per-channel scores.
        class_names: The C channel names.
        background_index: Channel to leave out, or None.
        vmin: Darkest value; None uses the minimum over the shown channels.
        vmax: Brightest value; None uses the maximum over the shown channels.
        tile_size: Longer side of each map in pixels.
        columns: Tiles per row; None picks a near-square grid.
        threshold: The background threshold θ to mark on the colour bar; None takes the value of the
            background channel when ``background_index`` is given and that channel is constant (the
            predictor's θ channel), else no mark.

    Returns:
        ``[H', W', 3]`` uint8 RGB picture.

    Raises:
        InvalidInputError: As :func:`heatmap_tiles`.
    """
    tiles, (low, high) = heatmap_tiles(scores, class_names, background_index=background_index, vmin=vmin,
                                       vmax=vmax, tile_size=tile_size)
    grid = image_grid([tile for _, tile in tiles], [str(class_names[i]) for i, _ in tiles], columns=columns)
    if threshold is None and background_index is not None:
        channel = _to_numpy(scores)[background_index]
        if channel.size and np.all(channel == channel.flat[0]) and np.isfinite(channel.flat[0]):
            threshold = float(channel.flat[0])
    mark = None
    if threshold is not None and np.isfinite(threshold):
        span = high - low
        position = 0.0 if not span > 0 else float(np.clip((threshold - low) / span, 0.0, 1.0))
        side = "<" if threshold < low else ">" if threshold > high else ""
        mark = (position, f"{side}θ={threshold:.4g}")
    return _with_colorbar(grid, f"{low:.4g}", f"{high:.4g}", mark=mark)


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


def attention_tiles(attention: np.ndarray | torch.Tensor, *, tile_size: int = DEFAULT_TILE_SIZE) -> list[np.ndarray]:
    """Colour each head's attention map on its own scale (its minimum dark, its maximum bright).

    Heads differ in peakiness by orders of magnitude, so a shared scale would leave most of them black.

    Args:
        attention: ``[M, H, W]`` float CLS->patch attention per head (e.g. ``ImageFeatures.attention_maps()``:
            softmax probabilities, stitched over windows).
        tile_size: Longer side of each map in pixels.

    Returns:
        M ``[h, w, 3]`` uint8 RGB tiles.

    Raises:
        InvalidInputError: ``attention`` is not ``[M, H, W]`` with M >= 1.
    """
    maps = _to_numpy(attention).astype(np.float32)
    if maps.ndim != 3 or maps.shape[0] < 1:
        raise InvalidInputError(f"attention must be [M, H, W] with at least one head; got shape {maps.shape}")
    tiles = []
    long_side = _tile_long_side(maps.shape[1:], tile_size)
    for head in maps:
        resized = _resize_map(head, long_side)
        tiles.append(colormap(resized, vmin=float(np.nanmin(resized)), vmax=float(np.nanmax(resized))))
    return tiles


def attention_grid(attention: np.ndarray | torch.Tensor, *, tile_size: int = DEFAULT_TILE_SIZE,
                   columns: int | None = None) -> np.ndarray:
    """A grid of per-head CLS attention maps, each on its own scale (see :func:`attention_tiles`).

    Args:
        attention: ``[M, H, W]`` float CLS->patch attention per head.
        tile_size: Longer side of each map in pixels.
        columns: Tiles per row; None uses ``ceil(sqrt(M))`` (4 columns for 12 heads).

    Returns:
        ``[H', W', 3]`` uint8 RGB picture, captions "head 0" ... "head M-1".
    """
    tiles = attention_tiles(attention, tile_size=tile_size)
    return image_grid(tiles, [f"head {m}" for m in range(len(tiles))], columns=columns)


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


# --------------------------------------------------------------------------------------------------------------
# COCO run-length encoding
# --------------------------------------------------------------------------------------------------------------


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
    array = _to_numpy(mask)
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
    indices = _validated_labels(_to_numpy(labels), len(class_names), max_classes=None)
    return [
        {"index": k, "name": str(name), **rle_encode(indices == k, compressed=compressed)}
        for k, name in enumerate(class_names)
    ]


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


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
    save_json(out_dir / f"{stem}.json", {"image": image, "files": files, **summary})
    return files


def result_file_names(stem: str, *, overlay: bool, save_scores: bool, save_heatmaps: bool,
                      save_attention: bool) -> dict[str, str]:
    """The picture and data files `write_result_files` writes for `stem`, by kind (its JSON, ``<stem>.json``,
    lists them under ``files``): the one place that names them, so a run can check its targets beforehand."""
    kinds = {"labels": "_labels.png", "legend": "_legend.png", "overlay": "_overlay.png" if overlay else "",
             "scores": "_scores.npz" if save_scores else "", "heatmaps": "_heatmaps.png" if save_heatmaps else "",
             "attention": "_attention.png" if save_attention else ""}
    return {kind: stem + suffix for kind, suffix in kinds.items() if suffix}


def _validated_labels(
    labels: np.ndarray, num_classes: int, *, max_classes: int | None = MAX_PALETTE_COLORS
) -> np.ndarray:
    """Check ``[H, W]`` integer labels in [0, num_classes); return them as uint8 (uint16 when `max_classes` is
    above 256, int64 if unbounded)."""
    if max_classes is not None and not 1 <= num_classes <= max_classes:
        kind = "a palette image" if max_classes <= MAX_PALETTE_COLORS else "a label map"
        raise InvalidInputError(f"num_classes must be in [1, {max_classes}] for {kind}; got {num_classes}")
    array = _to_numpy(labels)
    if array.ndim != 2 or not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise InvalidInputError(f"labels must be an [H, W] integer array; got shape {array.shape}, dtype {array.dtype}")
    if array.size:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= num_classes:
            raise InvalidInputError(
                f"labels must lie in [0, {num_classes}) for {num_classes} classes; got values in [{low}, {high}]"
            )
    if max_classes is None:
        return array.astype(np.int64)
    return array.astype(np.uint8 if max_classes <= MAX_PALETTE_COLORS else np.uint16)


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


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """``text`` cut with "..." so that it fits in ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _resize_map(values: np.ndarray, tile_size: int) -> np.ndarray:
    """``[H, W]`` float map resized bilinearly so that its longer side is ``tile_size`` (aspect kept)."""
    if tile_size < 1:
        raise InvalidInputError(f"tile_size must be a positive number of pixels; got {tile_size}")
    height, width = values.shape
    scale = tile_size / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # A 2-D float32 array becomes a mode "F" image: bilinear resizing on the values themselves, not on colours.
    resized = Image.fromarray(np.ascontiguousarray(values, dtype=np.float32)).resize(size, Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def _with_colorbar(grid: np.ndarray, low: str, high: str, *, mark: tuple[float, str] | None = None) -> np.ndarray:
    """Append a strip with the colour scale from ``low`` (left) to ``high`` (right) under a grid.

    ``mark``: ``(position in [0, 1] along the bar, label)``, drawn as a black-and-white line across the bar
    with its label on an extra text line under it (e.g. the background threshold θ).
    """
    height, width = grid.shape[:2]
    extra = _CAPTION_HEIGHT if mark is not None else 0
    canvas = Image.new("RGB", (width, height + _COLORBAR_HEIGHT + _CAPTION_HEIGHT + extra + _GRID_GAP),
                       _GRID_BACKGROUND)
    canvas.paste(Image.fromarray(grid), (0, 0))
    bar_width = max(1, width - 2 * _GRID_GAP)
    ramp = colormap(np.linspace(0.0, 1.0, bar_width)[None, :].repeat(_COLORBAR_HEIGHT, axis=0), vmin=0.0, vmax=1.0)
    canvas.paste(Image.fromarray(ramp), (_GRID_GAP, height))
    draw = ImageDraw.Draw(canvas)
    font, low = _caption_font(low)
    top = height + _COLORBAR_HEIGHT + 1
    draw.text((_GRID_GAP, top), low, fill=_GRID_TEXT, font=font)
    font, high = _caption_font(high)
    draw.text((width - _GRID_GAP - draw.textlength(high, font=font), top), high, fill=_GRID_TEXT, font=font)
    if mark is not None:
        position, label = mark
        x = _GRID_GAP + round(float(np.clip(position, 0.0, 1.0)) * (bar_width - 1))
        draw.rectangle((x - 1, height - 2, x + 1, height + _COLORBAR_HEIGHT + 1), fill=(255, 255, 255))
        draw.line((x, height - 2, x, height + _COLORBAR_HEIGHT + _CAPTION_HEIGHT), fill=_GRID_TEXT, width=1)
        font, label = _caption_font(label if _caption_font(label)[1] == label else label.replace("θ", "bg threshold "))
        text_width = draw.textlength(label, font=font)
        left = min(max(_GRID_GAP, x - text_width / 2), max(_GRID_GAP, width - _GRID_GAP - text_width))
        draw.text((left, top + _CAPTION_HEIGHT), label, fill=_GRID_TEXT, font=font)
    return np.asarray(canvas, dtype=np.uint8).copy()


def _tile_long_side(shape: Sequence[int], tile_size: int) -> int:
    """The longer side for tiles of ``[H, W]`` maps: ``tile_size``, raised for elongated maps (panoramas) so
    that the shorter side reaches ``tile_size / TILE_STRETCH``, up to ``TILE_STRETCH · tile_size`` and never
    beyond the map's own longer side (``tile_size = max(H, W)``, as the server asks, keeps the native size)."""
    if tile_size < 1:
        raise InvalidInputError(f"tile_size must be a positive number of pixels; got {tile_size}")
    short, long = sorted(int(side) for side in shape)
    if short < 1 or TILE_STRETCH * short >= long:
        return tile_size
    needed = int(np.ceil(tile_size * long / (TILE_STRETCH * short)))
    return max(tile_size, min(needed, TILE_STRETCH * tile_size, long))


_FONT_SIZE = 11
# Scalable fonts tried for captions, in order; the first that has every character of a caption draws it.
_FONT_FILES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/usr/share/fonts/truetype/unifont/unifont.ttf",
    "/System/Library/Fonts/PingFang.ttc",
    "C:/Windows/Fonts/msyh.ttc",
    "C:/Windows/Fonts/seguisym.ttf",
)
_FONTS: list[tuple[Any, bytes]] | None = None  # (font, its mask of a character no font has), loaded once
_NO_GLYPH = "\U0010fffd"  # a private-use code point: rendered as the font's "missing glyph" box, if anything


def _glyph_mask(font: Any, text: str) -> bytes:
    mask = font.getmask(text)
    return bytes(mask.size) + bytes(mask)


def _caption_fonts() -> list[tuple[Any, bytes]]:
    global _FONTS
    if _FONTS is None:
        fonts: list[Any] = []
        for path in dict.fromkeys(os.path.realpath(path) for path in _FONT_FILES):
            try:
                fonts.append(ImageFont.truetype(path, _FONT_SIZE))
            except OSError:
                continue
        try:
            fonts.append(ImageFont.load_default(size=_FONT_SIZE))  # Pillow >= 10.1 with FreeType
        except (TypeError, ImportError, OSError):
            pass
        if not fonts:
            fonts.append(ImageFont.load_default())  # the bitmap font: ASCII only
        _FONTS = [(font, _glyph_mask(font, _NO_GLYPH)) for font in fonts]
    return _FONTS


def _has_glyph(font: Any, missing: bytes, char: str) -> bool:
    if char.isspace() or (char.isascii() and char.isprintable()):
        return True
    try:
        return _glyph_mask(font, char) != missing
    except (UnicodeEncodeError, ValueError, OSError):  # the bitmap font encodes latin-1 only
        return False


def _caption_font(text: str) -> tuple[Any, str]:
    """A font that draws every character of ``text``, and the text it can draw.

    The first of :func:`_caption_fonts` with a glyph for every character (a glyph differs from the font's
    missing-glyph box); when none has them all, the first font, with the characters it lacks replaced by
    ``\\uXXXX`` / ``\\UXXXXXXXX`` escapes, so that a label is never drawn as empty boxes.
    """
    fonts = _caption_fonts()
    for font, missing in fonts:
        if all(_has_glyph(font, missing, char) for char in text):
            return font, text
    font, missing = fonts[0]
    escaped = "".join(char if _has_glyph(font, missing, char) else char.encode("unicode_escape").decode("ascii")
                      for char in text)
    return font, escaped


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


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")
