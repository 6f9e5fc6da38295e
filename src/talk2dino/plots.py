"""Small charts drawn with Pillow (no plotting dependency): sweep lines and ablation bars."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from talk2dino.fileio import atomic_path

_SIZE = (640, 400)
_MARGIN = 50
_BLUE = (31, 119, 180)


def _canvas(title: str) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    w, h = _SIZE
    img = Image.new("RGB", _SIZE, "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([_MARGIN, _MARGIN, w - _MARGIN, h - _MARGIN], outline="black")
    draw.text((_MARGIN, 15), title, fill="black")
    return img, draw


def _save(img: Image.Image, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def line_chart(points: Sequence[tuple[float, float]], path: str | os.PathLike[str], *, title: str) -> Path:
    """Save a line plot of (x, y) points (sorted by x), each point labelled with its y value."""
    points = sorted(points)
    w, h = _SIZE
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x1 = x1 if x1 > x0 else x0 + 1
    y0, y1 = (y0 - 1, y1 + 1) if y1 - y0 < 1e-9 else (y0, y1)
    img, draw = _canvas(title)

    def at(x: float, y: float) -> tuple[float, float]:
        return (_MARGIN + (x - x0) / (x1 - x0) * (w - 2 * _MARGIN),
                h - _MARGIN - (y - y0) / (y1 - y0) * (h - 2 * _MARGIN))

    draw.line([at(x, y) for x, y in points], fill=_BLUE, width=3)
    for x, y in points:
        cx, cy = at(x, y)
        draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=_BLUE)
        draw.text((cx - 12, cy - 18), f"{y:.1f}", fill="black")
        draw.text((cx - 12, h - _MARGIN + 6), f"{x:g}", fill="black")
    return _save(img, path)


def bar_chart(values: dict[str, float], path: str | os.PathLike[str], *, title: str) -> Path:
    """Save a bar chart of named values (bars from 0), each labelled with its value."""
    w, h = _SIZE
    top = max([*values.values(), 1e-9])
    img, draw = _canvas(title)
    slot = (w - 2 * _MARGIN) / max(len(values), 1)
    for i, (name, value) in enumerate(values.items()):
        x_left = _MARGIN + i * slot + slot * 0.2
        x_right = _MARGIN + (i + 1) * slot - slot * 0.2
        y_top = h - _MARGIN - value / top * (h - 2 * _MARGIN - 20)
        draw.rectangle([x_left, y_top, x_right, h - _MARGIN], fill=_BLUE)
        draw.text((x_left, y_top - 14), f"{value:.3g}", fill="black")
        draw.text((x_left, h - _MARGIN + 6), name, fill="black")
    return _save(img, path)
