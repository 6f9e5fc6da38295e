"""Tests for talk2dino.render (palette, label/overlay PNGs, score archives) and talk2dino.fileio's atomic
writes and JSON writer, and `SegmentationResult.shares`, the per-class pixel summary the result JSON holds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from talk2dino import InferenceConfig, SegmentationResult
from talk2dino.errors import InvalidInputError
from talk2dino.fileio import atomic_path, atomic_write_bytes, write_json
from talk2dino.labels import BACKGROUND_NAME
from talk2dino.render import (
    label_colors,
    label_rles,
    overlay,
    palette,
    save_label_png,
    save_overlay_png,
    save_scores_npz,
)


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name not in keep)


# --------------------------------------------------------------------------------------------------------------
# palette
# --------------------------------------------------------------------------------------------------------------


def test_palette_voc_values() -> None:
    colors = palette(8)
    assert colors.dtype == np.uint8 and colors.shape == (8, 3)
    expected = [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128], [0, 128, 128]]
    np.testing.assert_array_equal(colors[:7], expected)
    np.testing.assert_array_equal(colors[7], [128, 128, 128])
    np.testing.assert_array_equal(palette(9)[8], [64, 0, 0])
    np.testing.assert_array_equal(palette(256)[255], [224, 224, 192])  # the VOC "void" colour


def test_palette_is_distinct_deterministic_and_prefix_stable() -> None:
    full = palette(256)
    assert len({tuple(color) for color in full}) == 256
    np.testing.assert_array_equal(palette(21), full[:21])
    assert palette(0).shape == (0, 3)


@pytest.mark.parametrize("count", [257, -1])
def test_palette_rejects_bad_counts(count: int) -> None:
    with pytest.raises(InvalidInputError, match="256"):
        palette(count)


# --------------------------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------------------------


def test_atomic_write_bytes_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert _leftovers(tmp_path, {"out.bin"}) == []


def test_atomic_path_keeps_old_file_after_failure(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    target.write_text("old")
    seen: list[Path] = []
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as temporary:
        seen.append(temporary)
        assert temporary.parent == tmp_path and temporary != target
        temporary.write_text("partial")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert not seen[0].exists()
    assert _leftovers(tmp_path, {"result.json"}) == []


def test_atomic_path_temp_keeps_suffix_and_replaces_on_success(tmp_path: Path) -> None:
    target = tmp_path / "labels.png"
    with atomic_path(target) as temporary:
        assert temporary.suffix == ".png"
        assert not target.exists()
        temporary.write_bytes(b"data")
    assert target.read_bytes() == b"data"
    assert _leftovers(tmp_path, {"labels.png"}) == []


# --------------------------------------------------------------------------------------------------------------
# label PNG
# --------------------------------------------------------------------------------------------------------------


def test_label_png_round_trip(tmp_path: Path) -> None:
    labels = np.array([[0, 1, 2], [20, 3, 0]], dtype=np.int64)
    path = tmp_path / "labels.png"
    save_label_png(path, labels, num_classes=21, background_index=0)  # with a background: the VOC colour map
    with Image.open(path) as image:
        assert image.mode == "P"
        np.testing.assert_array_equal(np.array(image), labels)
        colors = np.array(image.convert("RGB"))
    np.testing.assert_array_equal(colors[0, 1], [128, 0, 0])
    np.testing.assert_array_equal(colors[1, 0], palette(21)[20])
    assert _leftovers(tmp_path, {"labels.png"}) == []


def test_label_png_accepts_tensor_and_max_index(tmp_path: Path) -> None:
    labels = torch.tensor([[255, 0], [1, 254]])
    path = tmp_path / "t.png"
    save_label_png(path, labels, num_classes=256)  # type: ignore[arg-type]
    with Image.open(path) as image:
        np.testing.assert_array_equal(np.array(image), labels.numpy())


@pytest.mark.parametrize(
    ("labels", "num_classes", "pattern"),
    [
        (np.array([[0, 256]]), 256, r"\[0, 256\)"),
        (np.array([[0, 3]]), 3, r"\[0, 3\)"),
        (np.array([[-1, 0]]), 3, "-1"),
        (np.array([[0, 1]]), 70_000, "num_classes"),  # above 65,536 (a 16-bit label map's limit)
        (np.zeros((2, 2), dtype=np.float32), 3, "integer"),
        (np.zeros((2, 2, 1), dtype=np.int64), 3, "integer"),
    ],
)
def test_label_png_rejects(tmp_path: Path, labels: np.ndarray, num_classes: int, pattern: str) -> None:
    path = tmp_path / "bad.png"
    with pytest.raises(InvalidInputError, match=pattern):
        save_label_png(path, labels, num_classes)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------------------
# overlay
# --------------------------------------------------------------------------------------------------------------


def test_overlay_exact_values_with_background() -> None:
    image = np.array([[[100, 50, 0], [101, 7, 255]], [[10, 20, 30], [200, 200, 200]]], dtype=np.uint8)
    labels = np.array([[1, 2], [0, 3]])
    # palette: 1 -> (128, 0, 0), 2 -> (0, 128, 0), 3 -> (128, 128, 0); alpha 0.5, halves round up.
    result = overlay(image, labels, num_classes=4, alpha=0.5, background_index=0)
    expected = np.array(
        [
            [[114, 25, 0], [51, 68, 128]],  # 0.5*101 + 0 = 50.5 -> 51; 0.5*7 + 64 = 67.5 -> 68; 255/2 -> 128
            [[10, 20, 30], [164, 164, 100]],  # background pixel unchanged
        ],
        dtype=np.uint8,
    )
    np.testing.assert_array_equal(result, expected)
    assert result.dtype == np.uint8
    assert not np.shares_memory(result, image)


def test_overlay_without_background_colours_every_pixel() -> None:
    image = np.full((2, 2, 3), 200, dtype=np.uint8)
    labels = np.zeros((2, 2), dtype=np.int64)
    # No background: label 0 is a real label and gets VOC colour 1 (128, 0, 0), never black; label 1 VOC colour 2.
    np.testing.assert_array_equal(overlay(image, labels, 2, alpha=0.5)[0, 0], [164, 100, 100])
    np.testing.assert_array_equal(overlay(image, labels, 2, alpha=0.0), image)
    np.testing.assert_array_equal(overlay(image, labels + 1, 2, alpha=1.0)[0, 0], [0, 128, 0])
    np.testing.assert_array_equal(overlay(image, labels, 2, alpha=0.25), np.tile([182, 150, 150], (2, 2, 1)))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [({"alpha": 1.5}, "alpha"), ({"background_index": 5}, "background_index")],
)
def test_overlay_rejects_bad_options(kwargs: dict[str, float], pattern: str) -> None:
    with pytest.raises(InvalidInputError, match=pattern):
        overlay(np.zeros((2, 2, 3), dtype=np.uint8), np.zeros((2, 2), dtype=np.int64), 3, **kwargs)  # type: ignore[arg-type]


def test_overlay_rejects_shape_mismatch_and_bad_image() -> None:
    with pytest.raises(InvalidInputError, match="does not match"):
        overlay(np.zeros((2, 3, 3), dtype=np.uint8), np.zeros((2, 2), dtype=np.int64), 3)
    with pytest.raises(InvalidInputError, match="uint8 HxWx3"):
        overlay(np.zeros((2, 2, 3), dtype=np.float32), np.zeros((2, 2), dtype=np.int64), 3)


def test_save_overlay_png(tmp_path: Path) -> None:
    image = np.full((3, 4, 3), 60, dtype=np.uint8)
    labels = np.array([[0, 1, 1, 0]] * 3)
    path = tmp_path / "overlay.png"
    save_overlay_png(path, image, labels, 2, alpha=0.5, background_index=0)
    with Image.open(path) as saved:
        assert saved.mode == "RGB"
        np.testing.assert_array_equal(np.array(saved), overlay(image, labels, 2, alpha=0.5, background_index=0))
    assert _leftovers(tmp_path, {"overlay.png"}) == []


# --------------------------------------------------------------------------------------------------------------
# scores npz
# --------------------------------------------------------------------------------------------------------------


def test_scores_npz_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    scores = rng.random((3, 4, 5)).astype(np.float32)
    names = ["cat", "window-blind", "bed ", "ünïcode"]
    path = tmp_path / "scores.npz"
    save_scores_npz(path, scores, names[:3])
    with np.load(path) as archive:  # no allow_pickle needed
        assert set(archive.files) == {"scores", "class_names"}
        assert archive["scores"].dtype == np.float16
        assert archive["scores"].shape == (3, 4, 5)
        np.testing.assert_allclose(archive["scores"], scores, atol=5e-4)
        assert archive["class_names"].tolist() == names[:3]
    assert _leftovers(tmp_path, {"scores.npz"}) == []


def test_scores_npz_accepts_tensor_and_keeps_exact_name(tmp_path: Path) -> None:
    scores = torch.linspace(0, 1, 2 * 2 * 3).reshape(2, 2, 3)
    path = tmp_path / "scores.bin"  # numpy would append ".npz" if given a name
    save_scores_npz(path, scores, ["a", "ünï"])
    assert _leftovers(tmp_path, set()) == ["scores.bin"]
    with np.load(path) as archive:
        np.testing.assert_allclose(archive["scores"], scores.numpy(), atol=5e-4)
        assert archive["class_names"].tolist() == ["a", "ünï"]


@pytest.mark.parametrize(
    ("scores", "names", "pattern"),
    [
        (np.zeros((2, 3, 3), dtype=np.float32), ["a"], "2 channels but 1"),
        (np.zeros((3, 3), dtype=np.float32), [], r"\[C, H, W\]"),
        (np.full((1, 2, 2), 1e6, dtype=np.float32), ["a"], "float16"),
    ],
)
def test_scores_npz_rejects(tmp_path: Path, scores: np.ndarray, names: list[str], pattern: str) -> None:
    with pytest.raises(InvalidInputError, match=pattern):
        save_scores_npz(tmp_path / "s.npz", scores, names)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------------------
# per-class shares (the result JSON's "labels") and JSON
# --------------------------------------------------------------------------------------------------------------


def _result(labels: list[list[int]], names: list[str], background_index: int | None) -> SegmentationResult:
    return SegmentationResult(torch.tensor(labels), torch.zeros(len(names), len(labels), len(labels[0])), names,
                              background_index, InferenceConfig())


def test_shares_count_pixels_per_class() -> None:
    result = _result([[0, 0, 1], [2, 2, 2], [2, 0, 0]], [BACKGROUND_NAME, "cat", "dog", "bird"], background_index=0)
    summary = result.shares()
    assert [entry["name"] for entry in summary] == ["background", "cat", "dog", "bird"]
    assert [entry["index"] for entry in summary] == [0, 1, 2, 3]
    assert [entry["pixels"] for entry in summary] == [4, 1, 4, 0]  # zero-pixel classes included
    assert summary[1]["share"] == round(1 / 9, 6)
    assert abs(sum(entry["share"] for entry in summary) - 1.0) < 1e-5
    assert all(type(entry["pixels"]) is int and type(entry["share"]) is float for entry in summary)
    json.dumps(summary)


def test_shares_without_background_keep_names() -> None:
    summary = _result([[0, 1], [1, 1]], ["sky", "tree"], background_index=None).shares()
    assert [(entry["name"], entry["share"]) for entry in summary] == [("sky", 0.25), ("tree", 0.75)]


def test_label_map_checks_reject_out_of_range_labels_and_background() -> None:
    # The checks the dead `outputs.summarize` made, where they live: every label-map writer validates its input.
    with pytest.raises(InvalidInputError, match=r"\[0, 2\)"):
        label_rles(np.array([[0, 2]]), ["a", "b"])
    with pytest.raises(InvalidInputError, match="background_index"):
        label_colors(2, background_index=2)


def test_write_json_utf8_indent_and_numpy(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    obj = {"name": "café", "count": np.int64(3), "share": np.float32(0.5), "list": np.arange(2), "path": Path("a")}
    write_json(path, obj)
    text = path.read_bytes().decode("utf-8")
    assert "café" in text
    assert text.startswith('{\n  "name"')
    assert text.endswith("\n")
    assert json.loads(text) == {"name": "café", "count": 3, "share": 0.5, "list": [0, 1], "path": "a"}
    assert _leftovers(tmp_path, {"summary.json"}) == []


def test_write_json_failure_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert path.read_text() == "old"
    assert _leftovers(tmp_path, {"summary.json"}) == []


def test_write_json_default_str_and_durable(tmp_path: Path) -> None:
    # The evaluation records write any setting as its text (default=str); durable=True flushes to disk.
    path = tmp_path / "settings.json"
    write_json(path, {"dtype": torch.float32, "n": 1}, durable=True, default=str)
    assert json.loads(path.read_text(encoding="utf-8")) == {"dtype": "torch.float32", "n": 1}
    assert _leftovers(tmp_path, {"settings.json"}) == []


def test_render_imports_neither_torch_nor_upper_layers() -> None:
    # Drawing a numpy label map must not load torch (tensors are accepted duck-typed), and render/ is library:
    # it never imports the CLI, server, training, extraction or evaluation.
    import subprocess
    import sys

    code = ("import sys, talk2dino.render; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('talk2dino.cli', 'talk2dino.server', "
            "'talk2dino.training', 'talk2dino.extract', 'talk2dino.evaluation'))]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
