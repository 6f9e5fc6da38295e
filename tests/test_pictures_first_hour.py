"""What a first-hour user sees (issue 13, points 3 and 11): label colours, the CLI's legend, plain --help texts.

- Black reads as "nothing": only a background class may be black, with or without ``--background``, in the label
  PNG's palette, the overlay, the server's JSON colours and the CLI's JSON.
- Every CLI picture has a key: ``<stem>_legend.png``, one row per label.
- ``--help`` never cites documents users cannot open (``method.md §4``, ``pitfall P5``).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_model_args as _model_args
from PIL import Image

from talk2dino.cli import main
from talk2dino.cli.main import build_parser
from talk2dino.render import label_image, overlay

DARK = 64  # a colour whose brightest channel is below this reads as black on a photo


def _is_dark(color: object) -> bool:
    return max(int(c) for c in np.asarray(color).ravel()) < DARK


def _palette_of(image: Image.Image, count: int) -> list[list[int]]:
    entries = image.getpalette() or []
    return [list(entries[3 * k:3 * k + 3]) for k in range(count)]


@pytest.mark.parametrize("background", [False, True])
def test_no_real_label_is_black_in_the_label_png_or_the_overlay(background: bool) -> None:
    count = 12
    labels = np.repeat(np.arange(count, dtype=np.uint8)[None, :], 3, axis=0)  # one column per class
    background_index = 0 if background else None
    colors = _palette_of(label_image(labels, count, background_index=background_index), count)
    for index, color in enumerate(colors):
        if index == background_index:
            assert color == [0, 0, 0]
        else:
            assert not _is_dark(color), (index, color)
    assert len({tuple(c) for c in colors}) == count  # still distinct
    # Pixel values stay the class indices.
    np.testing.assert_array_equal(np.asarray(label_image(labels, count, background_index=background_index)), labels)

    # Overlay of a black image at full opacity shows each class's colour; label 0 is a real label without
    # background, so its region must be coloured, and in the label PNG's colour.
    black = np.zeros((3, count, 3), dtype=np.uint8)
    blended = overlay(black, labels, count, alpha=1.0, background_index=background_index)
    if background:
        assert blended[0, 0].tolist() == [0, 0, 0]  # background left as is
    else:
        assert not _is_dark(blended[0, 0])
    for index in range(count):
        if index != background_index:
            assert blended[0, index].tolist() == colors[index]


@pytest.mark.parametrize("background", [False, True])
def test_server_json_colours_match_the_label_png_and_are_never_black(tiny_model, background: bool) -> None:
    pytest.importorskip("fastapi", reason="the server needs the 'serve' extra")
    pytest.importorskip("httpx", reason="the test client needs httpx")
    from fastapi.testclient import TestClient

    from talk2dino import InferenceConfig, Segmenter
    from talk2dino.server import create_app

    fast = InferenceConfig(short_side=56, max_long_side=400, window=28, stride=14, pamr_iterations=3)
    rgb = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    with TestClient(create_app(Segmenter(tiny_model, fast))) as client:
        response = client.post("/v1/segment", data={
            "labels": "cat, sofa, window", "background": str(background).lower(), "pamr": "false",
            "label_png": "true", "overlay": "true", "alpha": "1",
        }, files={"image": ("photo.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    entries = body["labels"]
    assert body["background_index"] == (0 if background else None)
    label_png = Image.open(io.BytesIO(base64.b64decode(body["label_png"])))
    assert [entry["color"] for entry in entries] == _palette_of(label_png, len(entries))
    for entry in entries:
        if entry["index"] == body["background_index"]:
            assert entry["color"] == [0, 0, 0]
        else:
            assert not _is_dark(entry["color"]), entry
    # The overlay at full opacity paints each labelled pixel with its JSON colour.
    labels = np.asarray(label_png)
    painted = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["overlay_png"]))).convert("RGB"))
    for entry in entries:
        mask = labels == entry["index"]
        if mask.any() and entry["index"] != body["background_index"]:
            assert (painted[mask] == entry["color"]).all(), entry


@pytest.mark.parametrize("background", [False, True])
def test_cli_json_carries_each_label_colour_and_a_legend_row_per_label(tiny_sources, tmp_path: Path,
                                                                       background: bool) -> None:
    from talk2dino.render import LEGEND_PADDING, LEGEND_ROW_HEIGHT, LEGEND_SWATCH

    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    flag = "--background" if background else "--no-background"
    code = main(["-q", "segment", str(image), "--labels", "cat, sofa, window", flag, "--no-pamr",
                 "--out", str(out), "--no-progress", *_model_args(tiny_sources)])
    assert code == 0
    summary = json.loads((out / "photo.json").read_text())
    entries = summary["labels"]
    assert len(entries) == 3 + int(background)
    png_palette = _palette_of(Image.open(out / "photo_labels.png"), len(entries))
    assert [entry["color"] for entry in entries] == png_palette
    for entry in entries:
        if entry["index"] == summary["background_index"]:
            assert entry["color"] == [0, 0, 0]
        else:
            assert not _is_dark(entry["color"]), entry

    assert summary["files"]["legend"] == "photo_legend.png"
    legend = np.asarray(Image.open(out / "photo_legend.png").convert("RGB"))
    pad = LEGEND_PADDING
    assert legend.shape[0] == 2 * pad + LEGEND_ROW_HEIGHT * len(entries)  # one row per label
    # Row k's swatch (left of the name, vertically centred in the row) has label k's colour.
    swatch_x = pad + LEGEND_SWATCH // 2
    for k, entry in enumerate(entries):
        swatch_y = pad + k * LEGEND_ROW_HEIGHT + LEGEND_ROW_HEIGHT // 2
        assert legend[swatch_y, swatch_x].tolist() == entry["color"], k
        # ... and a name: dark text pixels right of the swatch.
        row = legend[pad + k * LEGEND_ROW_HEIGHT:pad + (k + 1) * LEGEND_ROW_HEIGHT, 2 * pad + LEGEND_SWATCH:]
        assert (row.max(axis=2) < 128).sum() > 5, k


def _subcommands() -> list[str]:
    parser = build_parser()
    for action in parser._actions:
        if action.choices and isinstance(action.choices, dict):
            return sorted(action.choices)
    raise AssertionError("no subcommands found")


@pytest.mark.parametrize("command", [None, *_subcommands()])
def test_help_cites_no_internal_documents(command: str | None, capsys) -> None:
    argv = [command, "--help"] if command else ["--help"]
    with contextlib.suppress(SystemExit):
        main(argv)
    text = capsys.readouterr().out
    assert "usage:" in text
    for reference in ("§", "method.md", "pitfall"):
        assert reference not in text, f"{command} --help cites {reference!r}:\n{text}"


def test_cli_overlay_and_legend_of_the_example_photo(tiny_sources, tmp_path: Path) -> None:
    """The README's photo through the CLI: overlay and legend exist, sized as the photo and one row per class;
    with TALK2DINO_ARTIFACTS set (CI), both are copied there to be looked at."""
    from talk2dino.render import LEGEND_PADDING, LEGEND_ROW_HEIGHT

    photo = Path(__file__).resolve().parents[1] / "examples" / "rocket.jpg"
    out = tmp_path / "out"
    # No background class: random tiny weights would leave every pixel under the threshold.
    code = main(["-q", "segment", str(photo), "--labels", "rocket, smoke, sky, tree", "--no-background",
                 "--out", str(out), "--no-progress", *_model_args(tiny_sources)])
    assert code == 0
    overlay_png, legend_png = out / "rocket_overlay.png", out / "rocket_legend.png"
    assert Image.open(overlay_png).size == Image.open(photo).size
    assert Image.open(legend_png).size[1] == 2 * LEGEND_PADDING + 4 * LEGEND_ROW_HEIGHT  # one row per label
    artifacts = os.environ.get("TALK2DINO_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        for picture in (overlay_png, legend_png):
            shutil.copy(picture, Path(artifacts) / f"cli-{picture.name}")
