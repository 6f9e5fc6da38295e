"""Text in pictures: the caption font that has a label's characters, and text cut to a width.

Captions of the picture grids and names in the legend are drawn with the first of a list of scalable fonts
that has a glyph for every character (DejaVu Sans, CJK fonts when installed, Pillow's own FreeType font);
characters no font has are written as ``\\uXXXX`` escapes, so a label is never drawn as empty boxes.
"""

from __future__ import annotations

import os
from typing import Any

from PIL import ImageDraw, ImageFont

__all__ = ["CANVAS_COLOR", "TEXT_COLOR", "caption_font", "caption_fonts", "fit_text", "has_glyph"]

CANVAS_COLOR = (255, 255, 255)
"""Background of the picture grids and the legend (white)."""
TEXT_COLOR = (0, 0, 0)
"""Colour of captions and legend names (black)."""

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


def caption_fonts() -> list[tuple[Any, bytes]]:
    """The caption fonts that load here, in order of preference, each with its mask of a missing glyph.

    Loaded once per process; the last resort is Pillow's bitmap font (ASCII only).
    """
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


def has_glyph(font: Any, missing: bytes, char: str) -> bool:
    """Whether `font` draws `char` as something other than its missing-glyph box (`missing`, its mask)."""
    if char.isspace() or (char.isascii() and char.isprintable()):
        return True
    try:
        return _glyph_mask(font, char) != missing
    except (UnicodeEncodeError, ValueError, OSError):  # the bitmap font encodes latin-1 only
        return False


def caption_font(text: str) -> tuple[Any, str]:
    """A font that draws every character of ``text``, and the text it can draw.

    The first of :func:`caption_fonts` with a glyph for every character (a glyph differs from the font's
    missing-glyph box); when none has them all, the first font, with the characters it lacks replaced by
    ``\\uXXXX`` / ``\\UXXXXXXXX`` escapes, so that a label is never drawn as empty boxes.
    """
    fonts = caption_fonts()
    for font, missing in fonts:
        if all(has_glyph(font, missing, char) for char in text):
            return font, text
    font, missing = fonts[0]
    escaped = "".join(char if has_glyph(font, missing, char) else char.encode("unicode_escape").decode("ascii")
                      for char in text)
    return font, escaped


def fit_text(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """``text`` cut with "..." so that it fits in ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
