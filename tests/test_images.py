"""Tests for talk2dino.data.images: loading, conversion to RGB uint8, the benchmark resize, input expansion."""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from talk2dino.data import images
from talk2dino.data.image_lists import list_images
from talk2dino.data.images import load_image, resize_uint8, to_rgb_uint8
from talk2dino.errors import InvalidInputError, Talk2DinoError

# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def _shared_dir() -> Path | None:
    candidate = os.environ.get("TALK2DINO_SHARED")
    path = Path(candidate) if candidate else Path(__file__).resolve().parents[2] / "shared"
    return path if path.is_dir() else None


def _noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (height, width, channels) if channels else (height, width)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _truncate(path: Path, keep_fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


# --------------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------------


def test_invalid_input_error_is_a_value_error_and_a_talk2dino_error() -> None:
    error = InvalidInputError("x")
    assert isinstance(error, ValueError)
    assert isinstance(error, Talk2DinoError)


# --------------------------------------------------------------------------------------------------------------
# load_image: modes and channel order
# --------------------------------------------------------------------------------------------------------------


def test_pure_red_png_is_red_in_channel_0(tmp_path: Path) -> None:
    # Pitfall P1: the loader returns RGB, never BGR.
    path = tmp_path / "red.png"
    Image.new("RGB", (5, 4), (255, 0, 0)).save(path)
    array = load_image(path)
    assert array.shape == (4, 5, 3)
    assert array.dtype == np.uint8
    assert array.flags.c_contiguous and array.flags.writeable
    assert (array[..., 0] == 255).all()
    assert (array[..., 1:] == 0).all()


def test_rgb_png_round_trip_is_exact(tmp_path: Path) -> None:
    pixels = _noise(7, 9)
    path = tmp_path / "noise.png"
    Image.fromarray(pixels).save(path)
    np.testing.assert_array_equal(load_image(str(path)), pixels)


def test_grayscale_is_replicated(tmp_path: Path) -> None:
    gray = _noise(6, 5, channels=0)
    path = tmp_path / "gray.png"
    Image.fromarray(gray).save(path)
    assert Image.open(path).mode == "L"
    array = load_image(path)
    assert array.shape == (6, 5, 3)
    for channel in range(3):
        np.testing.assert_array_equal(array[..., channel], gray)


def test_la_drops_alpha(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    Image.new("LA", (4, 3), (77, 0)).save(path)
    assert Image.open(path).mode == "LA"
    array = load_image(path)
    assert array.shape == (3, 4, 3)
    assert (array == 77).all()


def test_palette_with_transparency(tmp_path: Path) -> None:
    path = tmp_path / "palette.png"
    image = Image.new("P", (4, 4), 0)
    image.putpalette([10, 20, 30, 40, 50, 60] + [0] * (256 * 3 - 6))
    image.putpixel((1, 2), 1)
    image.info["transparency"] = 0
    image.save(path)
    reopened = Image.open(path)
    assert reopened.mode == "P" and "transparency" in reopened.info
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Pillow palette-transparency warning either
        array = load_image(path)
    assert array.shape == (4, 4, 3)
    np.testing.assert_array_equal(array[0, 0], [10, 20, 30])  # transparent index keeps its stored colour
    np.testing.assert_array_equal(array[2, 1], [40, 50, 60])


def test_palette_without_transparency(tmp_path: Path) -> None:
    path = tmp_path / "palette.gif"
    image = Image.new("P", (3, 3), 1)
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * (256 * 3 - 6))
    image.save(path)
    array = load_image(path)
    np.testing.assert_array_equal(array[1, 1], [200, 100, 50])


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (3, 2), (10, 200, 30, 0)).save(path)
    array = load_image(path)
    assert array.shape == (2, 3, 3)
    np.testing.assert_array_equal(array[1, 2], [10, 200, 30])


def test_cmyk_jpeg_converts_to_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    array = load_image(path)
    assert array.shape == (16, 16, 3)
    red, green, blue = (int(value) for value in array[8, 8])
    assert red >= 245 and green <= 10 and blue <= 10


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 65535, 32768], [257, 1000, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    array = load_image(path)
    assert array.dtype == np.uint8
    expected = np.array([[0, 255, 128], [1, 4, 255]], dtype=np.uint8)  # round(v * 255 / 65535)
    for channel in range(3):
        np.testing.assert_array_equal(array[..., channel], expected)


def test_one_bit_image(tmp_path: Path) -> None:
    path = tmp_path / "bits.png"
    image = Image.new("1", (4, 4), 0)
    image.putpixel((3, 0), 1)
    image.save(path)
    array = load_image(path)
    np.testing.assert_array_equal(array[0, 3], [255, 255, 255])
    np.testing.assert_array_equal(array[0, 0], [0, 0, 0])


def test_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    # Stored 40 wide x 20 high, left half red, right half blue; orientation 6 means "rotate 90° clockwise to
    # display", so the displayed image is 20 wide x 40 high with red on top.
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    array = load_image(path)
    assert array.shape == (40, 20, 3)
    top, bottom = array[5, 10].astype(int), array[35, 10].astype(int)
    assert top[0] > 240 and top[2] < 15
    assert bottom[2] > 240 and bottom[0] < 15


def _rotated_jpeg(path: Path) -> Path:
    """Stored 40 wide x 20 high (left half red), EXIF orientation 6 (displayed 20 x 40, red on top)."""
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif, quality=95)
    return path


def test_exif_orientation_can_be_left_alone(tmp_path: Path) -> None:
    # Training-feature extraction keeps the stored pixels (COCO annotations refer to them): the same decoder,
    # with the flag off.
    path = _rotated_jpeg(tmp_path / "rotated.jpg")
    stored = load_image(path, exif_transpose=False)
    assert stored.shape == (20, 40, 3)
    np.testing.assert_array_equal(stored, np.array(Image.open(path).convert("RGB")))
    assert load_image(path).shape == (40, 20, 3)


def test_bytes_and_file_objects_decode_like_the_path(tmp_path: Path) -> None:
    path = _rotated_jpeg(tmp_path / "rotated.jpg")
    expected = load_image(path)
    data = path.read_bytes()
    for source in (data, bytearray(data), memoryview(data), io.BytesIO(data)):
        np.testing.assert_array_equal(load_image(source), expected)
    with path.open("rb") as handle:
        handle.read(7)  # read from the start whatever the position
        np.testing.assert_array_equal(load_image(handle), expected)
    spooled = tempfile.SpooledTemporaryFile(max_size=10)  # rolled over to disk, as a framework spools uploads
    spooled.write(data)
    np.testing.assert_array_equal(load_image(spooled, exif_transpose=False), load_image(path, exif_transpose=False))


def test_bytes_errors_use_the_given_name(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"^notes\.png: cannot identify image file"):
        load_image(b"certainly not an image", name="notes.png")
    with pytest.raises(InvalidInputError, match=r"^image data: cannot identify"):
        load_image(b"certainly not an image")
    with pytest.raises(InvalidInputError, match=r"^upload\.png: cannot identify"):
        load_image(io.BytesIO(b"nope"), name="upload.png")
    with pytest.raises(InvalidInputError, match="file path, the file's bytes, or a binary file object"):
        load_image(12)  # type: ignore[arg-type]


def test_size_refusals_are_image_too_large_and_keep_the_checks_type(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = io.BytesIO()
    Image.fromarray(_noise(20, 30)).save(buffer, format="PNG")
    data = buffer.getvalue()

    def _must_not_decode(self: Image.Image) -> None:
        raise AssertionError("pixels were decoded")

    with monkeypatch.context() as patch:
        patch.setattr(ImageFile.ImageFile, "load", _must_not_decode)
        with pytest.raises(images.ImageTooLargeError, match=r"^big\.png: image is 30x20 pixels"):
            load_image(data, name="big.png", max_pixels=599)
        headers: list[tuple[int, int, str]] = []

        def refuse(width: int, height: int, mode: str) -> None:
            headers.append((width, height, mode))
            raise images.ImageTooLargeError("over the server's limit")

        with pytest.raises(images.ImageTooLargeError, match=r"^big\.png: over the server's limit$"):
            load_image(data, name="big.png", check_header=refuse)
        assert headers == [(30, 20, "RGB")]

        def reject(width: int, height: int, mode: str) -> None:
            raise InvalidInputError("not wanted")

        with pytest.raises(InvalidInputError, match="not wanted") as info:
            load_image(data, check_header=reject)
        assert not isinstance(info.value, images.ImageTooLargeError)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow's own guard: also "too large"
    with pytest.raises(images.ImageTooLargeError, match="decompression bomb"):
        load_image(data, max_pixels=10**6)


# --------------------------------------------------------------------------------------------------------------
# load_image: errors
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file_raises_with_path(tmp_path: Path, suffix: str) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    path = tmp_path / f"cut{suffix}"
    Image.fromarray(_noise(64, 64)).save(path)
    _truncate(path)
    with pytest.raises(InvalidInputError, match="truncated") as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_text_file_named_jpg_raises(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("not an image\n")
    with pytest.raises(InvalidInputError, match="cannot identify") as info:
        load_image(path)
    assert str(info.value).startswith(f"{path}: ")


def test_one_by_one_image_raises(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    Image.new("RGB", (1, 1)).save(path)
    with pytest.raises(InvalidInputError, match=r"photo\.png: image is 1x1 pixels; need at least 2x2"):
        load_image(path)


def test_thin_image_raises(tmp_path: Path) -> None:
    path = tmp_path / "line.png"
    Image.new("RGB", (50, 1)).save(path)
    with pytest.raises(InvalidInputError, match="50x1"):
        load_image(path)


def test_too_many_pixels_raises_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    Image.fromarray(_noise(20, 30)).save(path)

    def _must_not_decode(self: Image.Image) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", _must_not_decode)
    with pytest.raises(InvalidInputError, match=r"big\.png: image is 30x20 pixels \(600\)") as info:
        load_image(path, max_pixels=599)
    assert "599" in str(info.value)

    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(InvalidInputError, match="30x20"):
        load_image(path)


def test_max_pixels_limit_is_inclusive(tmp_path: Path) -> None:
    path = tmp_path / "ok.png"
    Image.fromarray(_noise(20, 30)).save(path)
    assert load_image(path, max_pixels=600).shape == (20, 30, 3)


def test_pillow_decompression_bomb_error_becomes_invalid_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bomb.png"
    Image.fromarray(_noise(20, 30)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow's hard error above 2 x 100 pixels
    with pytest.raises(InvalidInputError, match=r"bomb\.png: .*decompression bomb"):
        load_image(path, max_pixels=10**6)


def test_pillow_bomb_warning_is_not_leaked_when_within_our_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "large.png"
    Image.fromarray(_noise(20, 30)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 600 pixels: Pillow would warn, not fail
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path, max_pixels=1000).shape == (20, 30, 3)


def test_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="no such file"):
        load_image(tmp_path / "absent.png")


def test_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="folder"):
        load_image(tmp_path)


def test_non_positive_max_pixels_raises(tmp_path: Path) -> None:
    path = tmp_path / "ok.png"
    Image.fromarray(_noise(4, 4)).save(path)
    with pytest.raises(InvalidInputError, match="max_pixels"):
        load_image(path, max_pixels=0)


# --------------------------------------------------------------------------------------------------------------
# to_rgb_uint8
# --------------------------------------------------------------------------------------------------------------


def test_to_rgb_pil_rgb_and_modes() -> None:
    pixels = _noise(5, 6)
    np.testing.assert_array_equal(to_rgb_uint8(Image.fromarray(pixels)), pixels)
    gray = to_rgb_uint8(Image.new("L", (3, 2), 9))
    assert gray.shape == (2, 3, 3) and (gray == 9).all()
    rgba = to_rgb_uint8(Image.new("RGBA", (3, 2), (1, 2, 3, 4)))
    np.testing.assert_array_equal(rgba[0, 0], [1, 2, 3])


def test_to_rgb_pil_applies_exif_orientation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.new("RGB", (40, 20), (0, 200, 0)).save(path, exif=exif)
    with Image.open(path) as image:
        assert to_rgb_uint8(image).shape == (40, 20, 3)


def test_to_rgb_pil_sixteen_bit_and_int32() -> None:
    deep = Image.fromarray(np.array([[0, 65535], [32768, 257]], dtype=np.uint16))
    np.testing.assert_array_equal(to_rgb_uint8(deep)[..., 1], [[0, 255], [128, 1]])
    wide = Image.fromarray(np.array([[-5, 70000], [32768, 0]], dtype=np.int32))
    assert wide.mode == "I"
    np.testing.assert_array_equal(to_rgb_uint8(wide)[..., 2], [[0, 255], [128, 0]])


def test_to_rgb_pil_float_mode() -> None:
    unit = Image.fromarray(np.array([[0.0, 1.0], [0.5, 0.25]], dtype=np.float32))
    assert unit.mode == "F"
    np.testing.assert_array_equal(to_rgb_uint8(unit)[..., 0], [[0, 255], [128, 64]])
    bytes_range = Image.fromarray(np.array([[0.0, 300.0], [100.4, 2.0]], dtype=np.float32))
    np.testing.assert_array_equal(to_rgb_uint8(bytes_range)[..., 0], [[0, 255], [100, 2]])
    with pytest.raises(InvalidInputError, match="NaN"):
        to_rgb_uint8(Image.fromarray(np.array([[0.0, np.nan], [0.0, 0.0]], dtype=np.float32)))


def test_to_rgb_numpy_rgb_is_copied_and_contiguous() -> None:
    pixels = _noise(4, 5)
    result = to_rgb_uint8(pixels)
    np.testing.assert_array_equal(result, pixels)
    assert not np.shares_memory(result, pixels)
    flipped = pixels[:, ::-1]
    result = to_rgb_uint8(flipped)
    assert result.flags.c_contiguous
    np.testing.assert_array_equal(result, flipped)


def test_to_rgb_numpy_gray_and_alpha() -> None:
    gray = _noise(3, 4, channels=0)
    np.testing.assert_array_equal(to_rgb_uint8(gray), np.stack([gray] * 3, axis=-1))
    np.testing.assert_array_equal(to_rgb_uint8(gray[:, :, None]), np.stack([gray] * 3, axis=-1))
    rgba = _noise(3, 4, channels=4)
    np.testing.assert_array_equal(to_rgb_uint8(rgba), rgba[..., :3])
    assert to_rgb_uint8(rgba).flags.c_contiguous


def test_to_rgb_tensor_uint8_is_permuted() -> None:
    pixels = _noise(4, 6)
    tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
    result = to_rgb_uint8(tensor)
    assert result.shape == (4, 6, 3) and result.dtype == np.uint8
    assert result.flags.c_contiguous
    np.testing.assert_array_equal(result, pixels)
    tensor.zero_()
    np.testing.assert_array_equal(result, pixels)  # no shared memory


def test_to_rgb_tensor_float_unit_range_is_scaled() -> None:
    tensor = torch.zeros(3, 2, 2, requires_grad=True)
    with torch.no_grad():
        tensor[0, 0, 0] = 1.0
        tensor[1, 0, 1] = 0.5
        tensor[2, 1, 0] = 0.2
    result = to_rgb_uint8(tensor)
    np.testing.assert_array_equal(result[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(result[0, 1], [0, 128, 0])  # 127.5 rounds to even 128
    np.testing.assert_array_equal(result[1, 0], [0, 0, 51])
    half = to_rgb_uint8(torch.full((3, 2, 2), 0.5, dtype=torch.float16))
    assert (half == 128).all()


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        (np.zeros((4, 4, 3), dtype=np.float32), "float32"),
        (np.zeros((4, 4, 3), dtype=np.uint16), "uint16"),
        (np.zeros((3, 8, 8), dtype=np.uint8), "channel-first"),
        (np.zeros((4, 4, 2), dtype=np.uint8), r"\(4, 4, 2\)"),
        (np.zeros((2, 4, 4, 3), dtype=np.uint8), "shape"),
        (torch.zeros(4, 4, 3, dtype=torch.uint8), r"\[4, 4, 3\]"),
        (torch.zeros(1, 3, 4, 4, dtype=torch.uint8), "tensor"),
        (torch.zeros(3, 4, 4, dtype=torch.int64), "int64"),
        (torch.full((3, 4, 4), 255.0), r"\[0, 1\]"),
        (torch.full((3, 4, 4), -0.1), r"\[0, 1\]"),
        (torch.tensor(float("nan")).expand(3, 4, 4), "NaN"),
        ([[1, 2], [3, 4]], "list"),
        (None, "NoneType"),
        ("photo.png", "str"),
    ],
)
def test_to_rgb_rejects(value: object, pattern: str) -> None:
    with pytest.raises(InvalidInputError, match=pattern) as info:
        to_rgb_uint8(value)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_to_rgb_rejection_names_expected_forms() -> None:
    with pytest.raises(InvalidInputError, match=r"expected a PIL image, an RGB uint8 HxWx3 numpy array"):
        to_rgb_uint8(np.zeros((4, 4, 3), dtype=np.float64))


@pytest.mark.parametrize(
    "value",
    [np.zeros((1, 1, 3), dtype=np.uint8), np.zeros((1, 5), dtype=np.uint8), torch.zeros(3, 5, 1, dtype=torch.uint8)],
)
def test_to_rgb_min_size(value: object) -> None:
    with pytest.raises(InvalidInputError, match="need at least 2x2"):
        to_rgb_uint8(value)  # type: ignore[arg-type]


def test_to_rgb_truncated_pil_image_raises(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    Image.fromarray(_noise(64, 64)).save(path)
    _truncate(path)
    with Image.open(path) as image, pytest.raises(InvalidInputError, match="truncated"):
        to_rgb_uint8(image)


# --------------------------------------------------------------------------------------------------------------
# resize_uint8
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(448, 673), (21, 17), (7, 100), (64, 48)])
def test_resize_matches_cv2(height: int, width: int) -> None:
    pixels = _noise(50, 60, seed=3)
    result = resize_uint8(pixels, height, width)
    assert result.shape == (height, width, 3)
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, cv2.resize(pixels, (width, height), interpolation=cv2.INTER_LINEAR))


def test_resize_has_no_antialiasing_and_is_not_pil() -> None:
    pixels = _noise(600, 512, seed=4)
    result = resize_uint8(pixels, 525, 448)
    pil = np.array(Image.fromarray(pixels).resize((448, 525), Image.BILINEAR))
    assert not np.array_equal(result, pil)
    np.testing.assert_array_equal(result, cv2.resize(pixels, (448, 525), interpolation=cv2.INTER_LINEAR))


def test_resize_same_size_is_copy_free() -> None:
    pixels = _noise(8, 9)
    assert resize_uint8(pixels, 8, 9) is pixels


def test_resize_non_contiguous_input() -> None:
    pixels = _noise(20, 30)
    flipped = pixels[:, ::-1]
    np.testing.assert_array_equal(
        resize_uint8(flipped, 10, 15),
        cv2.resize(np.ascontiguousarray(flipped), (15, 10), interpolation=cv2.INTER_LINEAR),
    )


@pytest.mark.parametrize(
    "value",
    [np.zeros((8, 8, 3), dtype=np.float32), np.zeros((8, 8), dtype=np.uint8), np.zeros((8, 8, 4), dtype=np.uint8)],
)
def test_resize_rejects_non_rgb_uint8(value: np.ndarray) -> None:
    with pytest.raises(InvalidInputError, match="uint8 HxWx3"):
        resize_uint8(value, 4, 4)


def test_resize_rejects_empty_target() -> None:
    with pytest.raises(InvalidInputError, match="at least 1x1"):
        resize_uint8(_noise(8, 8), 0, 4)


@pytest.mark.reference
@pytest.mark.parametrize(
    ("name", "original_hw", "resized_hw"),
    [("chelsea", (300, 451), (448, 673)), ("astronaut", (512, 512), (448, 448)), ("coffee", (400, 600), (448, 672))],
)
def test_resize_matches_reference_resized_image(
    name: str, original_hw: tuple[int, int], resized_hw: tuple[int, int]
) -> None:
    # The golden PNGs are the reference implementation's resized RGB images (method.md §4.3): bit-exact parity.
    shared = _shared_dir()
    if shared is None:
        pytest.skip("shared folder not found (set TALK2DINO_SHARED or check out ../shared next to the project)")
    source = shared / "reference" / "images" / f"{name}.png"
    golden = shared / "parity" / "golden" / "inputs" / f"{name}_resized_rgb.png"
    if not source.is_file() or not golden.is_file():
        pytest.skip(f"reference image or golden resized image missing under {shared}")
    original = load_image(source)
    assert original.shape[:2] == original_hw
    resized = resize_uint8(original, *resized_hw)
    with Image.open(golden) as golden_image:
        expected = np.array(golden_image.convert("RGB"))
    assert resized.shape == expected.shape
    np.testing.assert_array_equal(resized, expected)


# --------------------------------------------------------------------------------------------------------------
# list_images
# --------------------------------------------------------------------------------------------------------------


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_list_images_scans_folder_sorted_non_recursive(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    for name in ["b.JPG", "a.png", "c.webp", "d.TIFF", "notes.txt", "e.bin", ".hidden.jpg", "f.gif", "g.jpeg"]:
        _touch(folder / name)
    _touch(folder / "sub" / "deep.png")
    (folder / "dir.png").mkdir()
    found = list_images([str(folder)])
    assert [path.name for path in found] == ["a.png", "b.JPG", "c.webp", "d.TIFF", "f.gif", "g.jpeg"]
    assert all(path.parent == folder for path in found)
    recursive = list_images([str(folder)], recursive=True)
    assert folder / "sub" / "deep.png" in recursive


def test_list_images_keeps_explicit_files_whatever_the_extension(tmp_path: Path) -> None:
    odd = _touch(tmp_path / "scan.dat")
    assert list_images([str(odd)]) == [odd]


def test_list_images_reads_list_files(tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    first = _touch(lists / "imgs" / "one.png")
    second = _touch(tmp_path / "two.jpg")
    folder = tmp_path / "more"
    third = _touch(folder / "three.png")
    list_file = lists / "inputs.txt"
    list_file.write_text(
        "# comment line\n\nimgs/one.png\n   \n" + f"{second}\n" + "../more\n" + "  # indented comment\n",
        encoding="utf-8",
    )
    expected = [first.resolve(), second.resolve(), third.resolve()]
    # Relative entries are joined to the list file's folder as written ("lists/../more/three.png").
    assert [path.resolve() for path in list_images([f"@{list_file}"])] == expected
    assert [path.resolve() for path in list_images([str(list_file)])] == expected
    assert list_images([str(list_file)])[0] == lists / "imgs" / "one.png"


def test_list_images_keeps_order_and_drops_duplicates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "f"
    a = _touch(folder / "a.png")
    b = _touch(folder / "b.png")
    z = _touch(tmp_path / "z.png")
    list_file = tmp_path / "l.txt"
    list_file.write_text("f/b.png\nz.png\n")
    monkeypatch.chdir(tmp_path)
    found = list_images([str(z), str(folder), str(list_file), "z.png", "./f/a.png", str(z)])
    assert found == [z, a, b]


def test_list_images_accepts_a_single_string(tmp_path: Path) -> None:
    path = _touch(tmp_path / "a.png")
    assert list_images(str(path)) == [path]


def test_list_images_missing_inputs_raise(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="no such file or folder"):
        list_images([str(tmp_path / "absent.png")])
    with pytest.raises(InvalidInputError, match="list file not found"):
        list_images([f"@{tmp_path / 'absent.txt'}"])
    list_file = tmp_path / "bad.txt"
    list_file.write_text("# header\nmissing.png\n")
    with pytest.raises(InvalidInputError, match=r"bad\.txt:2: .*missing\.png"):
        list_images([str(list_file)])


def test_list_images_empty_folder(tmp_path: Path) -> None:
    assert list_images([str(tmp_path)]) == []
