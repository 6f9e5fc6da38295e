"""Label maps as pictures: the label colours, the palette PNG, the legend and the overlay.

This module is the one implementation of the label colours (:func:`palette`, :func:`label_colors`), the
palette PNG label map (:func:`label_image`), the legend (:func:`legend_image`) and the overlay
(:func:`overlay`), shared by the CLI (through :mod:`talk2dino.render.save`), the HTTP server and its web page:
the server encodes the same images to bytes (:func:`png_bytes`, :func:`label_png_bytes`) and its page only
displays what the server drew, so the three can never disagree.

Label colours follow the PASCAL VOC colour map (:func:`palette`), whose colour 0 is black. Black means "no
label", so only a background class gets it: :func:`label_colors` gives real labels the VOC colours from 1 on
(without a background class, label ``k`` gets VOC colour ``k + 1``). Label maps keep the class indices as pixel
values either way; only their palette follows :func:`label_colors`.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from talk2dino.errors import InvalidInputError
from talk2dino.render.arrays import as_numpy
from talk2dino.render.text import CANVAS_COLOR, TEXT_COLOR, caption_font, fit_text

__all__ = [
    "DEFAULT_OVERLAY_ALPHA",
    "LEGEND_PADDING",
    "LEGEND_ROW_HEIGHT",
    "LEGEND_SWATCH",
    "MAX_LABEL_CLASSES",
    "MAX_PALETTE_COLORS",
    "OVERLAY_CHUNK_PIXELS",
    "PICTURE_COMPRESS_LEVEL",
    "label_colors",
    "label_image",
    "label_png_bytes",
    "legend_image",
    "overlay",
    "palette",
    "png_bytes",
    "validated_labels",
]

MAX_PALETTE_COLORS: int = 256
"""A palette PNG stores at most 256 colours: label maps of up to 256 classes (indices 0-255) are palette PNGs."""

MAX_LABEL_CLASSES: int = 65536
"""Most classes a label map may hold: above :data:`MAX_PALETTE_COLORS` it is a 16-bit greyscale PNG (indices
0-65535, no palette), and the overlay and legend take the colours from :func:`label_colors`, which go on past 256."""

OVERLAY_CHUNK_PIXELS: int = 1 << 20
"""Pixels blended at a time by :func:`overlay`: its float64 arithmetic costs ~100 bytes a pixel, so a
150-megapixel image blended at once needed 15 GB; in bands of rows it needs a few hundred MB at most."""

DEFAULT_OVERLAY_ALPHA: float = 0.5
"""Weight of the class colour in :func:`overlay`; the image gets ``1 - alpha``. The one default of the CLI's
``--overlay-alpha``, the server's ``alpha`` field and ``SegmentationResult.overlay``/``save``."""

LEGEND_ROW_HEIGHT = 20
"""Pixels per class row in :func:`legend_image`."""
LEGEND_SWATCH = 14
"""Side of each colour swatch in :func:`legend_image`, in pixels."""
LEGEND_PADDING = 6
"""Margin around the legend and between swatch and name, in pixels."""
LEGEND_MAX_TEXT_WIDTH = 400
"""Longer names are cut with "..." (pixels)."""

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


def label_image(labels: np.ndarray, num_classes: int, *, background_index: int | None = None) -> Image.Image:
    """The palette ("P" mode) image behind `render.save.save_label_png`: pixel values are class indices.

    Args:
        labels: ``[H, W]`` integer class indices in [0, num_classes).
        num_classes: Number of classes C (background included), in [1, 65536].
        background_index: Index of the background class, or None when there is none.

    Returns:
        A "P" mode PIL image whose palette is :func:`label_colors` ``(num_classes, background_index=...)``;
        above 256 classes an "I;16" image of the indices (16-bit greyscale, no palette).

    Raises:
        InvalidInputError: ``labels`` is not a 2-D integer array, holds values outside [0, num_classes), or
            ``num_classes`` is outside [1, 65536].
    """
    if num_classes > MAX_PALETTE_COLORS:
        wide = validated_labels(labels, num_classes, max_classes=MAX_LABEL_CLASSES)
        return Image.fromarray(wide.astype(np.uint16))  # mode "I;16": saved as a 16-bit greyscale PNG
    indices = validated_labels(labels, num_classes)
    image = Image.fromarray(indices)  # mode "L"; putpalette turns it into "P"
    image.putpalette(label_colors(num_classes, background_index=background_index).tobytes())
    return image


def label_png_bytes(labels: np.ndarray, num_classes: int, *, background_index: int | None = None) -> bytes:
    """`render.save.save_label_png` to bytes instead of a file (the server's ``label_png``).

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
    rows = [caption_font(text) for text in texts]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = min(LEGEND_MAX_TEXT_WIDTH,
                     max([int(measure.textlength(t, font=f)) + 1 for f, t in rows] + [60]))
    text_left = LEGEND_PADDING + LEGEND_SWATCH + LEGEND_PADDING
    width = text_left + text_width + LEGEND_PADDING
    height = 2 * LEGEND_PADDING + LEGEND_ROW_HEIGHT * len(names)
    canvas = Image.new("RGB", (width, height), CANVAS_COLOR)
    draw = ImageDraw.Draw(canvas)
    inset = (LEGEND_ROW_HEIGHT - LEGEND_SWATCH) // 2
    for k, (font, text) in enumerate(rows):
        top = LEGEND_PADDING + k * LEGEND_ROW_HEIGHT
        box = (LEGEND_PADDING, top + inset, LEGEND_PADDING + LEGEND_SWATCH - 1, top + inset + LEGEND_SWATCH - 1)
        draw.rectangle(box, fill=tuple(int(c) for c in rgb[k]), outline=(128, 128, 128))
        draw.text((text_left, top + LEGEND_ROW_HEIGHT // 2), fit_text(draw, text, font, text_width),
                  fill=TEXT_COLOR, font=font, anchor="lm")
    return canvas


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
    indices = validated_labels(labels, num_classes, max_classes=MAX_LABEL_CLASSES)
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


def validated_labels(
    labels: np.ndarray, num_classes: int, *, max_classes: int | None = MAX_PALETTE_COLORS
) -> np.ndarray:
    """Check ``[H, W]`` integer labels in [0, num_classes); return them as uint8 (uint16 when `max_classes` is
    above 256, int64 if unbounded)."""
    if max_classes is not None and not 1 <= num_classes <= max_classes:
        kind = "a palette image" if max_classes <= MAX_PALETTE_COLORS else "a label map"
        raise InvalidInputError(f"num_classes must be in [1, {max_classes}] for {kind}; got {num_classes}")
    array = as_numpy(labels)
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
