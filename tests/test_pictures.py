"""Pictures and encodings shared by the CLI and the server: colour map, grids, attention maps, COCO RLE."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from talk2dino import InferenceConfig, Segmenter
from talk2dino.errors import InvalidInputError
from talk2dino.render import (
    attention_grid,
    colormap,
    heatmap_grid,
    heatmap_tiles,
    image_grid,
    label_colors,
    label_png_bytes,
    label_rles,
    rle_decode,
    rle_encode,
    save_attention_png,
    save_heatmaps_png,
)

# ---------------------------------------------------------------------------------------------- COCO RLE


def test_rle_of_a_hand_computed_mask() -> None:
    mask = np.array([[0, 1], [1, 1], [0, 0]], dtype=np.uint8)
    # Column-major: column 0 is 0,1,0 and column 1 is 1,1,0 -> runs 1 zero, 1 one, 1 zero, 2 ones, 1 zero.
    assert rle_encode(mask, compressed=False) == {"size": [3, 2], "counts": [1, 1, 1, 2, 1]}
    # Compressed: 1, 1, 1, then deltas to two places before: 2 - 1 = 1 and 1 - 1 = 0 -> "1", "1", "1", "1", "0".
    assert rle_encode(mask) == {"size": [3, 2], "counts": "11110"}
    np.testing.assert_array_equal(rle_decode(rle_encode(mask)), mask)


def test_rle_multi_character_and_negative_deltas() -> None:
    # Runs 1, 40, 1, 2 over a 4x11 mask. 40 needs two 5-bit groups ("X1"); the fourth count is stored as
    # 2 - 40 = -38, two groups with the sign in bit 4 of the last one ("jN").
    flat = np.repeat([0, 1, 0, 1], [1, 40, 1, 2]).astype(np.uint8)
    mask = flat.reshape((4, 11), order="F")
    assert rle_encode(mask)["counts"] == "1X11jN"
    np.testing.assert_array_equal(rle_decode(rle_encode(mask)), mask)


def test_rle_edge_cases() -> None:
    assert rle_encode(np.ones((2, 3)), compressed=False)["counts"] == [0, 6]  # starts with an empty run of 0s
    assert rle_encode(np.zeros((2, 3)), compressed=False)["counts"] == [6]
    assert rle_encode(np.zeros((0, 3)), compressed=False) == {"size": [0, 3], "counts": [0]}
    with pytest.raises(InvalidInputError, match="add up"):
        rle_decode({"size": [2, 2], "counts": [1, 1]})
    with pytest.raises(InvalidInputError, match=r"\[H, W\]"):
        rle_encode(np.zeros((2, 2, 2)))


def test_rle_agrees_with_pycocotools() -> None:
    mask_api = pytest.importorskip("pycocotools.mask", reason="pycocotools not installed (optional cross-check)")
    rng = np.random.default_rng(0)
    for trial in range(50):
        h, w = (int(x) for x in rng.integers(1, 40, 2))
        mask = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        if trial == 0:
            mask[:] = 1
        reference = mask_api.encode(np.asfortranarray(mask))
        ours = rle_encode(mask)
        assert ours["counts"] == reference["counts"].decode("ascii")
        assert ours["size"] == [int(s) for s in reference["size"]]
        np.testing.assert_array_equal(rle_decode(ours), mask)


def test_label_rles_cover_every_class() -> None:
    labels = np.array([[0, 2], [2, 2]])
    rles = label_rles(labels, ["background", "cat", "sofa"])
    assert [r["name"] for r in rles] == ["background", "cat", "sofa"]
    for rle in rles:
        np.testing.assert_array_equal(rle_decode(rle), labels == rle["index"])


def test_label_png_bytes_is_the_palette_png() -> None:
    labels = np.array([[0, 1], [3, 2]])
    image = Image.open(io.BytesIO(label_png_bytes(labels, 4)))
    assert image.mode == "P"
    np.testing.assert_array_equal(np.array(image), labels)
    np.testing.assert_array_equal(np.array(image.convert("RGB"))[1, 0], label_colors(4)[3])
    assert label_colors(4)[3].tolist() == [0, 0, 128]  # no background: label k gets VOC colour k + 1


# ---------------------------------------------------------------------------------------------- pictures
def test_colormap_ends_and_degenerate_ranges() -> None:
    colors = colormap(np.array([0.0, 0.5, 1.0, 2.0, np.nan]), vmin=0.0, vmax=1.0)
    assert colors.dtype == np.uint8 and colors.shape == (5, 3)
    np.testing.assert_array_equal(colors[0], [68, 1, 84])  # viridis' dark end
    np.testing.assert_array_equal(colors[2], [253, 231, 37])  # and its bright end
    np.testing.assert_array_equal(colors[3], colors[2])  # clipped
    np.testing.assert_array_equal(colors[4], colors[0])  # NaN shows as the low end
    np.testing.assert_array_equal(colormap(np.full((2, 2), 3.0), vmin=3.0, vmax=3.0), np.full((2, 2, 3), [68, 1, 84]))
    luminance = colormap(np.linspace(0, 1, 50), vmin=0, vmax=1).astype(float) @ [0.299, 0.587, 0.114]
    assert np.all(np.diff(luminance) > 0)  # readable in greyscale: brightness grows with the value


def test_heatmap_grid_skips_background_and_shares_one_scale(tmp_path) -> None:
    scores = np.stack([np.full((20, 30), 0.55), np.linspace(0, 1, 600).reshape(20, 30), np.zeros((20, 30))])
    tiles, (low, high) = heatmap_tiles(scores, ["background", "cat", "sofa"], background_index=0, tile_size=60)
    assert [i for i, _ in tiles] == [1, 2] and (low, high) == (0.0, 1.0)
    assert tiles[0][1].shape == (40, 60, 3)  # aspect kept, longer side 60
    np.testing.assert_array_equal(tiles[1][1], np.full((40, 60, 3), [68, 1, 84], dtype=np.uint8))
    grid = heatmap_grid(scores, ["background", "cat", "sofa"], background_index=0, tile_size=60)
    assert grid.shape[1] >= 2 * 60 and grid.dtype == np.uint8
    save_heatmaps_png(tmp_path / "h.png", torch.from_numpy(scores), ["background", "cat", "sofa"],
                      background_index=0, tile_size=60)
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "h.png")), grid)
    with pytest.raises(InvalidInputError, match="no label channel"):
        heatmap_grid(scores[:1], ["background"], background_index=0)
    with pytest.raises(InvalidInputError, match="class names"):
        heatmap_grid(scores, ["a", "b"])


def test_attention_and_generic_grids(tmp_path) -> None:
    heads = np.random.default_rng(0).random((5, 10, 20)).astype(np.float32)
    grid = attention_grid(heads, tile_size=40, columns=5)
    assert grid.shape[1] == 5 * 40 + 6 * 4  # five 40-pixel tiles, gaps of 4
    save_attention_png(tmp_path / "a.png", heads, tile_size=40)
    assert Image.open(tmp_path / "a.png").mode == "RGB"
    with pytest.raises(InvalidInputError, match="captions"):
        image_grid([np.zeros((2, 2, 3), np.uint8)], [])
    long = image_grid([np.zeros((10, 30, 3), np.uint8)], ["a caption far too long for a tile of thirty pixels"])
    assert long.shape == (10 + 16 + 8, 30 + 8, 3)


def test_attention_maps_are_stitched_per_head_softmax(tiny_model) -> None:
    segmenter = Segmenter(tiny_model, InferenceConfig(short_side=56, max_long_side=400, window=28, stride=14))
    features = segmenter.set_image(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    maps = features.attention_maps()
    heads = features.output.attn_logits.shape[1]
    assert maps.shape == (heads, *features.resized_size) and maps.dtype == torch.float32
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1

    single = segmenter.set_image(np.random.default_rng(1).integers(0, 256, (56, 56, 3), dtype=np.uint8))
    single_maps = single.attention_maps()
    probs = torch.softmax(single.output.attn_logits.float(), dim=-1).view(-1, heads, *single.output.grid)
    # A 56x56 image gives 3x3 windows of 28 with stride 14: pixel (27, 27) lies in the four starting at 0 or 14.
    expected = F.interpolate(probs, size=(28, 28), mode="bilinear", align_corners=True)
    covering = [expected[i, :, 27 - y1, 27 - x1] for i, (y1, y2, x1, x2) in enumerate(single.boxes)
                if y1 <= 27 < y2 and x1 <= 27 < x2]
    assert len(covering) == 4
    torch.testing.assert_close(single_maps[:, 27, 27], torch.stack(covering).mean(0))
