"""Pictures of score maps and attention heads: the colour map, captioned grids, and a colour bar.

One shared colour map (:func:`colormap`, viridis-like, no plotting library) draws the per-label score maps
(:func:`heatmap_grid`, one shared scale) and the per-head CLS attention maps (:func:`attention_grid`, one scale
per head) for the CLI's ``--save-heatmaps`` / ``--save-attention`` and the server's pictures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from talk2dino.errors import InvalidInputError
from talk2dino.render.arrays import as_numpy
from talk2dino.render.text import CANVAS_COLOR, TEXT_COLOR, caption_font, fit_text

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_TILE_SIZE",
    "TILE_STRETCH",
    "attention_grid",
    "attention_tiles",
    "colormap",
    "heatmap_grid",
    "heatmap_tiles",
    "image_grid",
]

DEFAULT_TILE_SIZE: int = 256
"""Longer side, in pixels, of each map in the heat-map and attention grids."""

TILE_STRETCH = 4
"""Heat-map / attention tiles keep a shorter side of at least ``tile_size / TILE_STRETCH`` pixels (panoramas get
a longer side of up to ``TILE_STRETCH · tile_size`` instead of a sliver)."""

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
_COLORBAR_HEIGHT = 12


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
    array = as_numpy(values).astype(np.float64)
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
    fonts when installed, Pillow's own FreeType font; see `render.text.caption_font`); characters no font has
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
    canvas = Image.new("RGB", (width, height), CANVAS_COLOR)
    draw = ImageDraw.Draw(canvas)
    for index, (tile, caption) in enumerate(zip(tiles, captions, strict=True)):
        row, col = divmod(index, cols)
        left = _GRID_GAP + col * (cell_w + _GRID_GAP)
        top = _GRID_GAP + row * (cell_h + _GRID_GAP)
        font, text = caption_font(caption)
        draw.text((left, top + 1), fit_text(draw, text, font, cell_w), fill=TEXT_COLOR, font=font)
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
    maps = as_numpy(scores).astype(np.float32)
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
        channel = as_numpy(scores)[background_index]
        if channel.size and np.all(channel == channel.flat[0]) and np.isfinite(channel.flat[0]):
            threshold = float(channel.flat[0])
    mark = None
    if threshold is not None and np.isfinite(threshold):
        span = high - low
        position = 0.0 if not span > 0 else float(np.clip((threshold - low) / span, 0.0, 1.0))
        side = "<" if threshold < low else ">" if threshold > high else ""
        mark = (position, f"{side}θ={threshold:.4g}")
    return _with_colorbar(grid, f"{low:.4g}", f"{high:.4g}", mark=mark)


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
    maps = as_numpy(attention).astype(np.float32)
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
                       CANVAS_COLOR)
    canvas.paste(Image.fromarray(grid), (0, 0))
    bar_width = max(1, width - 2 * _GRID_GAP)
    ramp = colormap(np.linspace(0.0, 1.0, bar_width)[None, :].repeat(_COLORBAR_HEIGHT, axis=0), vmin=0.0, vmax=1.0)
    canvas.paste(Image.fromarray(ramp), (_GRID_GAP, height))
    draw = ImageDraw.Draw(canvas)
    font, low = caption_font(low)
    top = height + _COLORBAR_HEIGHT + 1
    draw.text((_GRID_GAP, top), low, fill=TEXT_COLOR, font=font)
    font, high = caption_font(high)
    draw.text((width - _GRID_GAP - draw.textlength(high, font=font), top), high, fill=TEXT_COLOR, font=font)
    if mark is not None:
        position, label = mark
        x = _GRID_GAP + round(float(np.clip(position, 0.0, 1.0)) * (bar_width - 1))
        draw.rectangle((x - 1, height - 2, x + 1, height + _COLORBAR_HEIGHT + 1), fill=(255, 255, 255))
        draw.line((x, height - 2, x, height + _COLORBAR_HEIGHT + _CAPTION_HEIGHT), fill=TEXT_COLOR, width=1)
        font, label = caption_font(label if caption_font(label)[1] == label else label.replace("θ", "bg threshold "))
        text_width = draw.textlength(label, font=font)
        left = min(max(_GRID_GAP, x - text_width / 2), max(_GRID_GAP, width - _GRID_GAP - text_width))
        draw.text((left, top + _CAPTION_HEIGHT), label, fill=TEXT_COLOR, font=font)
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
