"""Small charts drawn with Pillow (no plotting dependency): sweep lines (evaluation) and ablation bars (training)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from talk2dino.fileio import atomic_path

__all__ = ["bar_chart", "line_chart"]

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


def _axis_labels(img: Image.Image, draw: ImageDraw.ImageDraw, x_label: str | None, y_label: str | None) -> None:
    """The x label centred under the plot, the y label turned 90° left of the tick labels."""
    w, h = _SIZE
    if x_label:
        left, _, right, _ = draw.textbbox((0, 0), x_label)
        draw.text(((w - (right - left)) / 2, h - _MARGIN + 22), x_label, fill="black")
    if y_label:
        left, top, right, bottom = draw.textbbox((0, 0), y_label)
        label = Image.new("RGB", (int(right - left) + 2, int(bottom - top) + 2), "white")
        ImageDraw.Draw(label).text((1 - left, 1 - top), y_label, fill="black")
        turned = label.rotate(90, expand=True)
        img.paste(turned, (4, int((h - turned.height) / 2)))


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round values from `low` to `high` (steps of 1, 2 or 5 times a power of ten)."""
    import math

    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks = []
    value = first
    while value <= high + 1e-9 * max(1.0, abs(high)):
        ticks.append(round(value, 10))
        value += step
    return ticks


def line_chart(points: Sequence[tuple[float, float]], path: str | os.PathLike[str], *, title: str,
               x_label: str | None = None, y_label: str | None = None) -> Path:
    """Save a line plot of (x, y) points (sorted by x), each point labelled with its y value.

    The x axis has a tick at every point, the y axis about five round ticks; `x_label` and `y_label` name the axes.
    """
    points = sorted(points)
    w, h = _SIZE
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x1 = x1 if x1 > x0 else x0 + 1
    y0, y1 = (y0 - 1, y1 + 1) if y1 - y0 < 1e-9 else (y0, y1)
    pad = (y1 - y0) * 0.1  # keep the top and bottom points (and their value labels) inside the frame
    y0, y1 = y0 - pad, y1 + pad
    img, draw = _canvas(title)

    def at(x: float, y: float) -> tuple[float, float]:
        return (_MARGIN + (x - x0) / (x1 - x0) * (w - 2 * _MARGIN),
                h - _MARGIN - (y - y0) / (y1 - y0) * (h - 2 * _MARGIN))

    for tick in _nice_ticks(y0, y1):
        _, ty = at(x0, tick)
        draw.line([(_MARGIN - 5, ty), (_MARGIN, ty)], fill="black")
        text = f"{tick:g}"
        left, top, right, bottom = draw.textbbox((0, 0), text)
        draw.text((_MARGIN - 8 - (right - left), ty - (bottom - top) / 2 - top), text, fill="black")
    draw.line([at(x, y) for x, y in points], fill=_BLUE, width=3)
    for x, y in points:
        cx, cy = at(x, y)
        draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=_BLUE)
        draw.text((cx - 12, cy - 18), f"{y:.1f}", fill="black")
        draw.line([(cx, h - _MARGIN), (cx, h - _MARGIN + 5)], fill="black")
        text = f"{x:g}"
        left, _, right, _ = draw.textbbox((0, 0), text)
        draw.text((cx - (right - left) / 2, h - _MARGIN + 7), text, fill="black")
    _axis_labels(img, draw, x_label, y_label)
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
