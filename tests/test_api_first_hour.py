"""The Python API a new user expects (issue 13.6-13.8): paths and HWC tensors as images, `from_pretrained`
with the weight overrides of `create_model`, and `SegmentationResult.save` / `.overlay` writing the CLI's files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from talk2dino import InferenceConfig, Segmenter, render
from talk2dino.cli import main
from talk2dino.data.images import as_rgb_image, to_rgb_uint8
from talk2dino.errors import InvalidInputError

EXIF_ORIENTATION = 0x0112


def _pixels(h: int = 40, w: int = 60, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def _rotated_jpeg(path: Path) -> Path:
    """A JPEG whose EXIF says 'rotate 90° clockwise' (orientation 6): decoded it is 60 high, 40 wide."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    Image.fromarray(_pixels(40, 60)).save(path, exif=exif.tobytes(), quality=95)
    return path


@pytest.fixture()
def segmenter(tiny_model) -> Segmenter:
    seg = Segmenter(tiny_model, InferenceConfig(short_side=56, max_long_side=400, window=28, stride=14,
                                                pamr_iterations=3, background=True))
    seg.set_classes(["cat", "sofa"])
    return seg


def _same(a, b) -> None:
    assert a.class_names == b.class_names
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.scores, b.scores)


# ---------------------------------------------------------------------------------------------------- 13.6 inputs
def test_path_input_equals_pil_input_bit_for_bit(segmenter: Segmenter, tmp_path: Path) -> None:
    path = _rotated_jpeg(tmp_path / "photo.jpg")
    segmenter.set_image(Image.open(path))
    from_pil = segmenter.predict()
    assert from_pil.labels.shape == (60, 40)  # EXIF orientation applied
    for given in (path, str(path)):
        features = segmenter.set_image(given)
        assert features.original_size == (60, 40)
        _same(segmenter.predict(), from_pil)
    batch = segmenter.predict_batch([path, Image.open(path)])
    _same(batch[0], from_pil)
    _same(batch[1], from_pil)


def test_hwc_tensor_equals_numpy_input(segmenter: Segmenter) -> None:
    pixels = _pixels(40, 60)
    segmenter.set_image(pixels)
    from_numpy = segmenter.predict()
    hwc = torch.from_numpy(pixels.copy())
    segmenter.set_image(hwc)
    _same(segmenter.predict(), from_numpy)
    # Float tensors: the dtype decides, values must lie in [0, 1] (scaled by 255 and rounded).
    segmenter.set_image(hwc.to(torch.float32) / 255)
    _same(segmenter.predict(), from_numpy)
    # [3, H, W] tensors are accepted exactly as before.
    segmenter.set_image(hwc.permute(2, 0, 1))
    _same(segmenter.predict(), from_numpy)
    _same(segmenter.predict_batch([hwc])[0], from_numpy)


def test_ambiguous_tensor_layout_is_channel_first() -> None:
    cube = torch.arange(27, dtype=torch.uint8).reshape(3, 3, 3)
    np.testing.assert_array_equal(as_rgb_image(cube), to_rgb_uint8(cube))  # [3, H, W], as before
    np.testing.assert_array_equal(as_rgb_image(cube), cube.permute(1, 2, 0).numpy())
    tall = torch.arange(3 * 5 * 3, dtype=torch.uint8).reshape(3, 5, 3)  # leading 3 wins over trailing 3
    assert as_rgb_image(tall).shape == (5, 3, 3)
    wide = torch.arange(4 * 5 * 3, dtype=torch.uint8).reshape(4, 5, 3)
    np.testing.assert_array_equal(as_rgb_image(wide), wide.numpy())


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        (torch.zeros(4, 5, 3, dtype=torch.int64),
         r"image file path.*got a tensor of shape \[4, 5, 3\] and dtype torch.int64"),
        (torch.full((4, 5, 3), 255.0), r"\[0, 1\]"),
        (torch.zeros(4, 5, 2, dtype=torch.uint8), r"image file path.*\[H,W,3\] tensor; got a tensor of shape"),
        (b"photo.jpg", "bytes.*load_image"),
        ([[1, 2], [3, 4]], "image file path.*list"),
        ("no/such/photo.jpg", "photo.jpg"),
    ],
)
def test_bad_inputs_raise_one_line(segmenter: Segmenter, value: object, pattern: str) -> None:
    with pytest.raises(InvalidInputError, match=pattern) as info:
        segmenter.set_image(value)
    assert "\n" not in str(info.value)


def test_predict_batch_refuses_a_single_image(segmenter: Segmenter, tmp_path: Path) -> None:
    path = _rotated_jpeg(tmp_path / "photo.jpg")
    for single in (str(path), path, Image.open(path), _pixels(), torch.zeros(3, 8, 8, dtype=torch.uint8)):
        with pytest.raises(InvalidInputError, match="sequence of images"):
            segmenter.predict_batch(single)


# ----------------------------------------------------------------------------------------------- 13.7 from_pretrained
@pytest.mark.parametrize("name", [None, "talk2dino-vitb14-reg"])
def test_from_pretrained_takes_create_model_overrides(tiny_model, tiny_sources, name) -> None:
    seg = Segmenter.from_pretrained(name, device="cpu", backbone=tiny_sources["backbone"],
                                    text_encoder=tiny_sources["text_encoder"],
                                    projection=tiny_sources["projection"], pamr=False)
    assert seg.config.pamr is False
    assert seg.model.weights_key == tiny_model.weights_key
    ours, theirs = seg.model.state_dict(), tiny_model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_from_pretrained_refuses_unknown_setting_before_loading() -> None:
    # A typo fails at once, naming it, instead of after (or instead of) loading weights.
    with pytest.raises(TypeError, match="text_encodr"):
        Segmenter.from_pretrained("no-such-model", text_encodr="x")


# --------------------------------------------------------------------------------------------- 13.8 save / overlay
def test_save_writes_what_the_cli_writes(tiny_sources, tmp_path: Path) -> None:
    image = tmp_path / "in" / "photo.png"
    image.parent.mkdir()
    Image.fromarray(_pixels(40, 60)).save(image)
    cli_out, api_out = tmp_path / "cli", tmp_path / "api"
    code = main(["segment", str(image), "--labels", "cat, sofa", "--background", "--out", str(cli_out),
                 "--no-progress", "--backbone", tiny_sources["backbone"], "--text-encoder",
                 tiny_sources["text_encoder"], "--projection", tiny_sources["projection"], "--device", "cpu"])
    assert code == 0

    seg = Segmenter.from_pretrained(None, device="cpu", **tiny_sources)
    seg.set_classes(["cat", "sofa"])
    seg.set_image(image)
    written = seg.predict(background=True).save(api_out, image=image)

    cli_json = json.loads((cli_out / "photo.json").read_text())
    api_json = json.loads((api_out / "photo.json").read_text())
    assert written["json"] == api_out / "photo.json"
    assert api_json["files"] == cli_json["files"] and "overlay" in api_json["files"]
    for kind, name in cli_json["files"].items():
        assert written[kind] == api_out / name
        assert (api_out / name).read_bytes() == (cli_out / name).read_bytes(), kind
    assert api_json["labels"] == cli_json["labels"]
    for key in ("image", "size", "background_index", "settings", "model"):
        assert api_json[key] == cli_json[key], key


def test_save_without_image_writes_no_overlay(segmenter: Segmenter, tmp_path: Path) -> None:
    segmenter.set_image(_pixels())
    result = segmenter.predict()
    written = result.save(tmp_path, stem="frame")
    assert "overlay" not in written and written["labels"] == tmp_path / "frame_labels.png"
    summary = json.loads(written["json"].read_text())
    assert summary["image"] is None and summary["labels"][0]["name"] == "background"
    np.testing.assert_array_equal(np.asarray(Image.open(written["labels"])), result.labels.numpy())
    with pytest.raises(InvalidInputError, match="stem"):
        result.save(tmp_path, stem="../x")


def test_overlay_equals_render_overlay(segmenter: Segmenter, tmp_path: Path) -> None:
    path = _rotated_jpeg(tmp_path / "photo.jpg")
    segmenter.set_image(path)
    result = segmenter.predict()
    rgb = as_rgb_image(path)
    for alpha in (None, 0.3):
        expected = render.overlay(rgb, result.labels.numpy(), len(result.class_names),
                                  alpha=render.DEFAULT_OVERLAY_ALPHA if alpha is None else alpha,
                                  background_index=result.background_index)
        picture = result.overlay(path, alpha=alpha)
        assert isinstance(picture, Image.Image) and picture.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(picture), expected)
    np.testing.assert_array_equal(np.asarray(result.overlay(Image.open(path))), np.asarray(result.overlay(path)))
