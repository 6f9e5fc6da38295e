"""Heat-map pictures (issue 13 point 4): θ on the colour bar, non-Latin captions, panorama tiles."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from talk2dino.render import attention_tiles, heatmap_grid, heatmap_tiles, image_grid
from talk2dino.render.text import caption_font, caption_fonts, has_glyph


def _scores(height: int = 30, width: int = 40) -> np.ndarray:
    rng = np.random.default_rng(0)
    scores = (0.3 + 0.4 * rng.random((3, height, width))).astype(np.float32)
    scores[0] = 0.55  # the predictor's constant θ channel
    return scores


def _bar_column_is_marked(grid: np.ndarray, position: float, bar_row: int) -> bool:
    width = grid.shape[1]
    bar_width = width - 2 * 4
    x = 4 + round(position * (bar_width - 1))
    return bool(np.all(grid[bar_row, x] == 0))


def test_heatmap_grid_marks_the_threshold_on_the_colour_bar() -> None:
    scores = _scores()
    names = ["background", "cat", "dog"]
    plain = heatmap_grid(scores[1:], names[1:], tile_size=60)  # no background: no mark, no extra line
    marked = heatmap_grid(scores, names, background_index=0, tile_size=60, threshold=0.5)
    derived = heatmap_grid(scores, names, background_index=0, tile_size=60)  # θ read from the constant channel
    assert marked.shape[0] == plain.shape[0] + 16  # one text line for "θ=0.5"
    low, high = float(scores[1:].min()), float(scores[1:].max())
    bar_row = plain.shape[0] - 16 - 4 - 12 + 6  # middle of the 12-pixel bar (same grid above it in all three)
    assert _bar_column_is_marked(marked, (0.5 - low) / (high - low), bar_row)
    assert _bar_column_is_marked(derived, (0.55 - low) / (high - low), bar_row)
    assert not _bar_column_is_marked(plain, (0.5 - low) / (high - low), bar_row)
    outside = heatmap_grid(scores, names, background_index=0, tile_size=60, threshold=0.95)
    assert _bar_column_is_marked(outside, 1.0, bar_row)  # drawn at the bright end, labelled ">θ=0.95"


def test_non_latin_captions_never_draw_missing_glyph_boxes() -> None:
    for label in ["кошка", "θ", "猫", "🐶 dog", "狗 and 🐱"]:
        font, text = caption_font(label)
        fonts = caption_fonts()
        missing = dict((id(f), m) for f, m in fonts)[id(font)]
        for char in text:
            assert has_glyph(font, missing, char), (label, text, char)
        if text != label:  # a character no available font has: an escape instead of a box
            assert "\\u" in text or "\\U" in text
    font, text = caption_font("кошка")
    assert text == "кошка"  # DejaVu Sans or Pillow's own FreeType font covers Cyrillic
    grid = image_grid([np.zeros((20, 200, 3), np.uint8)], ["🐶"])
    canvas = Image.new("L", (200, 16), 255)
    ImageDraw.Draw(canvas).text((0, 1), caption_font("🐶")[1], fill=0, font=caption_font("🐶")[0])
    assert np.array_equal(grid[4:20, 4:204, 0] < 128, np.asarray(canvas) < 128)


def test_panorama_tiles_keep_a_readable_short_side() -> None:
    scores = _scores(128, 2048)  # an 8000x500 image's stitched maps (max_long_side 2048): 16:1
    tiles, _ = heatmap_tiles(scores, ["background", "sky", "sea"], background_index=0)
    assert tiles[0][1].shape == (64, 1024, 3)  # short side tile_size/4, long side 4·tile_size
    grid = heatmap_grid(scores, ["background", "sky", "sea"], background_index=0)
    assert grid.shape[0] >= 2 * 64 and grid.shape[1] <= 1024 + 8  # stacked in one column, not a 524x108 strip
    assert attention_tiles(scores[1:])[0].shape == (64, 1024, 3)
    square, _ = heatmap_tiles(_scores(30, 40), ["background", "a", "b"], background_index=0)
    assert square[0][1].shape == (192, 256, 3)  # ordinary aspect ratios are unchanged
    native, _ = heatmap_tiles(scores, ["background", "sky", "sea"], background_index=0, tile_size=2048)
    assert native[0][1].shape == (128, 2048, 3)  # the server's tile_size=max(H, W): the native size, no stretch


def test_legend_draws_non_latin_names_as_the_captions_do() -> None:
    """The legend picks fonts like the captions: a name no font covers is drawn as its escapes, never as boxes."""
    from talk2dino.render import legend_image

    colors = np.array([[128, 0, 0]], dtype=np.uint8)
    for name in ("\u732b", "\u043a\u043e\u0442", "dog \U0001f436"):
        drawable = caption_font(name)[1]
        assert np.array_equal(np.asarray(legend_image([name], colors)), np.asarray(legend_image([drawable], colors)))
