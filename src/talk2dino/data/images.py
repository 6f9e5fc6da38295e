"""Image decoding, conversion and resizing: RGB uint8 everywhere.

This module is the one place where images enter the package (house-style §5 "Inputs"):

- :func:`load_image` decodes encoded image data (a file path, ``bytes``, or a binary file object such as an
  upload spooled by a web framework) into an ``[H, W, 3]`` uint8 RGB array, checking the header's size
  before any pixel is decoded. It is the package's one image decoder; EXIF orientation is a flag.
- :func:`to_rgb_uint8` converts the accepted API inputs (a PIL image, an RGB uint8 ``H×W×3`` numpy array, an
  RGB ``[3, H, W]`` tensor) into the same form.
- :func:`as_rgb_image` is what `Segmenter` calls: :func:`to_rgb_uint8`'s forms plus a file path (decoded by
  :func:`load_image`) and an ``[H, W, 3]`` tensor.
- :func:`resize_uint8` is the benchmark resize of method.md §4.3 (OpenCV ``INTER_LINEAR`` on uint8).

Which files to read (folders, list files) is `talk2dino.data.image_lists`. Channel order is RGB from here
on; no later step swaps channels (method.md pitfall P1).
"""

from __future__ import annotations

import io
import logging
import os
import struct
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from talk2dino.errors import InvalidInputError, error_reason, one_line
from talk2dino.fileio import open_regular

if TYPE_CHECKING:
    import torch

__all__ = [
    "DECODE_ERRORS",
    "MAX_IMAGE_PIXELS",
    "MIN_IMAGE_SIDE",
    "HeaderCheck",
    "ImageSource",
    "ImageTooLargeError",
    "as_rgb_image",
    "load_image",
    "resize_uint8",
    "to_rgb_uint8",
]

logger = logging.getLogger(__name__)

MAX_IMAGE_PIXELS: int = 178_956_970
"""Default decompression-bomb guard of :func:`load_image`, in pixels (width × height).

Twice Pillow's default warning threshold (89,478,485), i.e. Pillow's own hard-error threshold. A file whose
header declares more pixels is refused before any pixel data is decoded.
"""

MIN_IMAGE_SIDE: int = 2
"""Smallest accepted height and width, in pixels. A 1-pixel side cannot be resized or windowed meaningfully."""

_SIXTEEN_BIT_MAX = 65535
_UINT8_MAX = 255
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_EXPECTED_FORMS = "expected a PIL image, an RGB uint8 HxWx3 numpy array or an RGB [3,H,W] tensor"
_API_FORMS = ("expected an image file path, a PIL image, an RGB uint8 HxWx3 numpy array, or an RGB [3,H,W] "
              "or [H,W,3] tensor")
_SOURCE_FORMS = "expected an image file path, the file's bytes, or a binary file object"

# Errors that Pillow (or one of its format plugins) raises on files that are corrupt, truncated or not
# images at all. Anything else is a bug and propagates. Every reader of image files (label maps, extraction)
# catches this one list, so a decoder failure found by fuzzing is handled everywhere at once.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    SyntaxError,  # PNG plugin: broken chunks
    ValueError,  # e.g. PNG text chunk too large, bad tile descriptors
    EOFError,
    IndexError,
    KeyError,  # e.g. unknown mode names or tags in crafted headers
    TypeError,  # e.g. TIFF tags of the wrong type
    NotImplementedError,  # e.g. DDS: unimplemented pixel format (found by fuzzing)
    ZeroDivisionError,
    OverflowError,
    struct.error,
    Image.DecompressionBombError,
)

# warnings.catch_warnings mutates process-wide state; serialise our own use of it (Image.open only parses the
# header, so holding the lock is cheap).
_WARNINGS_LOCK = threading.Lock()

ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO
"""What :func:`load_image` decodes: a file path, the encoded file content, or a binary file object."""

HeaderCheck = Callable[[int, int, str], None]
"""``check(width, height, mode)`` on the header before decoding; refuses by raising :class:`InvalidInputError`."""


class ImageTooLargeError(InvalidInputError):
    """An image refused from its header for its size: over ``max_pixels``, Pillow's decompression-bomb guard, or
    a caller's size limit (a `check_header` may raise it). The HTTP server answers it 413 instead of 400."""


def load_image(source: ImageSource, *, name: str | None = None, max_pixels: int | None = None,
               check_header: HeaderCheck | None = None, exif_transpose: bool = True) -> np.ndarray:
    """Decode an image (a file, its bytes, or an open binary file) into an RGB uint8 array.

    Decoding uses Pillow; method.md §4.3 notes that Pillow and OpenCV decode the test JPEGs identically, and
    that only the resize must be OpenCV's. The header is read once: its size is checked (`max_pixels`,
    :data:`MIN_IMAGE_SIDE`, then `check_header`) before any pixel is decoded. Modes are converted as follows:

    - ``RGB``: as is. ``L``, ``1``, ``CMYK``, ``YCbCr`` …: Pillow's conversion to RGB (``1`` gives 0 / 255).
    - ``RGBA``, ``LA``, ``P`` and ``PA`` (with or without transparency): the alpha channel is **dropped**, not
      composited, so fully transparent pixels show whatever colour they store.
    - 16-bit greyscale (``I;16*``) and 32-bit integer ``I``: values in [0, 65535] are scaled to [0, 255],
      ``round(v * 255 / 65535)`` with halves rounded up; ``I`` values outside [0, 65535] are clipped first.
    - float ``F``: if all values lie in [0, 1] they are scaled by 255 and rounded; otherwise they are read as
      [0, 255] and clipped, like Pillow's own conversion. NaN or infinite values are refused.

    Args:
        source: an image file path (folders and list files are expanded by
            `talk2dino.data.image_lists.list_images`, not here); the encoded file content as ``bytes``,
            ``bytearray`` or ``memoryview``; or a readable binary file object (e.g. an upload the web framework
            spooled to memory or disk), read from its start. No temporary file is written.
        name: how the image is called in error messages (default: the path; ``"image data"`` for bytes, the
            file object's ``name`` when it is a string, else ``"image file"``).
        max_pixels: Largest accepted width × height, checked from the header before any pixel is decoded.
            ``None`` uses :data:`MAX_IMAGE_PIXELS`. Pillow's own guard (``PIL.Image.MAX_IMAGE_PIXELS``, a hard
            error at twice that value) still applies on top; raise it too to open larger files.
        check_header: Called with the header's ``(width, height, mode)`` (before EXIF orientation, which keeps
            the pixel count), after the `max_pixels` check and before any pixel is decoded; it refuses the image
            by raising :class:`InvalidInputError` (or :class:`ImageTooLargeError`, whose type is kept), whose
            message then follows the image's name (the CLI's memory guard ``--max-image-memory``, the server's
            ``--max-pixels`` and ``--max-score-values``).
        exif_transpose: Apply the EXIF orientation (the default, as a photo viewer shows the image). False keeps
            the stored pixel order, as training-feature extraction does (COCO's annotations refer to it).

    Returns:
        ``[H, W, 3]`` uint8 array, RGB, values in [0, 255], C-contiguous and writable; H and W are those of the
        image after EXIF orientation (when applied).

    Raises:
        ImageTooLargeError: The header declares more than ``max_pixels`` pixels, Pillow's decompression-bomb
            guard refuses it, or `check_header` raised it.
        InvalidInputError: The path is missing or a folder; the data is not a decodable image, is truncated or
            corrupt; a side is shorter than :data:`MIN_IMAGE_SIDE`; or `source` is of no accepted type. The
            message is one line, ``"<name>: <reason>"``.

    Note:
        Truncated files raise because the pixels are decoded (``Image.load``) inside the error handling and
        Pillow's default ``ImageFile.LOAD_TRUNCATED_IMAGES = False`` makes truncation an error. An application
        that sets that flag to ``True`` globally opts into silently padded images; this function does not
        change the flag, as it is process-wide state.
    """
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if limit < 1:
        raise InvalidInputError(f"max_pixels must be a positive number of pixels; got {limit}")
    options = (limit, check_header, exif_transpose)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(source), one_line(name or "image data", max_chars=1000), *options)
    if isinstance(source, (str, os.PathLike)):
        file_path = Path(source)
        # The name is quoted escaped, so that a file name holding a line break cannot split the message.
        shown = one_line(file_path if name is None else name, max_chars=1000)
        with _open_file(file_path, shown) as handle:
            return _decode(handle, shown, *options)
    if callable(getattr(source, "read", None)):
        own = getattr(source, "name", None)
        label = name if name is not None else own if isinstance(own, str) else "image file"
        return _decode(source, one_line(label, max_chars=1000), *options)
    raise InvalidInputError(f"load_image: {_SOURCE_FORMS}; got {_describe(source)}")


def _open_file(file_path: Path, shown: str) -> BinaryIO:
    """Open an image file for `load_image`, refusing folders, missing files and non-regular files."""
    try:
        is_dir, exists = file_path.is_dir(), file_path.exists()
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise InvalidInputError(f"{shown}: cannot open file ({one_line(exc.strerror or exc)})") from exc
    if is_dir:
        raise InvalidInputError(
            f"{shown}: is a folder, not an image file; pass image files, or expand folders with list_images"
        )
    if not exists:
        raise InvalidInputError(f"{shown}: no such file")
    try:
        # Refuses a FIFO (reading one blocks forever), socket or device, without blocking; Pillow then reads
        # the header from this handle, never reopening the path.
        return open_regular(file_path, "image")
    except OSError as exc:
        raise InvalidInputError(f"{shown}: cannot open file ({one_line(exc.strerror or exc)})") from exc


def _decode(handle: BinaryIO, shown: str, limit: int, check_header: HeaderCheck | None,
            exif_transpose: bool) -> np.ndarray:
    """`load_image` on opened binary data: one header read, the size checks, then the pixels."""
    try:
        # Our own limit (checked below, before decoding) is authoritative; silence Pillow's softer warning for
        # sizes between its threshold and ours. Pillow's hard DecompressionBombError is caught below.
        with _WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(handle)
    except UnidentifiedImageError as exc:
        raise InvalidInputError(
            f"{shown}: cannot identify image file (not an image, or a format Pillow cannot read)"
        ) from exc
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{shown}: refused as a possible decompression bomb ({error_reason(exc)})") from exc
    except OSError as exc:
        raise InvalidInputError(f"{shown}: cannot open file ({one_line(exc.strerror or exc)})") from exc
    except DECODE_ERRORS as exc:
        raise InvalidInputError(f"{shown}: cannot read image header ({error_reason(exc)})") from exc

    with opened as image:
        width, height = image.size
        # Image.open is lazy: only the header has been parsed so far, so these checks cost nothing.
        if width * height > limit:
            raise ImageTooLargeError(
                f"{shown}: image is {width}x{height} pixels ({width * height:,}), above the limit of "
                f"{limit:,}; refused without decoding (pass a larger max_pixels if the file is trusted)"
            )
        _check_min_size(width, height, where=shown)
        if check_header is not None:
            try:
                check_header(width, height, image.mode)
            except InvalidInputError as exc:
                kind = ImageTooLargeError if isinstance(exc, ImageTooLargeError) else InvalidInputError
                raise kind(f"{shown}: {exc}") from exc
        try:
            image.load()
        except DECODE_ERRORS as exc:
            raise InvalidInputError(
                f"{shown}: cannot decode image data, the file may be truncated or corrupt ({error_reason(exc)})"
            ) from exc
        try:
            rgb = _pil_to_rgb(image, exif_transpose=exif_transpose)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{shown}: {exc}") from exc
        except DECODE_ERRORS as exc:
            raise InvalidInputError(f"{shown}: cannot convert image to RGB ({error_reason(exc)})") from exc

    logger.debug("loaded %s: %dx%d, mode %s", shown, rgb.shape[1], rgb.shape[0], opened.mode)
    return rgb


def to_rgb_uint8(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """Convert an API image input into an RGB uint8 array; the one place where API inputs are converted.

    Accepted forms (house-style §5 "Inputs"):

    - a PIL image, any mode: converted as in :func:`load_image` (EXIF orientation applied, alpha dropped,
      16-bit scaled, …);
    - a numpy uint8 array: ``[H, W, 3]`` RGB; also ``[H, W]`` or ``[H, W, 1]`` greyscale (replicated to three
      channels) and ``[H, W, 4]`` RGBA (alpha dropped). Other dtypes, float included, are refused: the value
      range of a float array is ambiguous;
    - a torch tensor ``[3, H, W]`` RGB, either uint8 in [0, 255], or floating point with **every value in
      [0, 1]** (scaled by 255 and rounded to the nearest integer, ties to even). Float tensors outside [0, 1],
      other dtypes and other shapes are refused. The tensor may live on any device and may require grad.

    Args:
        image: The input image, in one of the forms above.

    Returns:
        ``[H, W, 3]`` uint8 array, RGB, values in [0, 255], C-contiguous and writable. It never shares memory
        with the input, so later changes to the input do not affect it.

    Raises:
        InvalidInputError: The input is of none of the accepted forms (the message lists them), contains
            values outside the accepted range, cannot be decoded, or has a side shorter than
            :data:`MIN_IMAGE_SIDE`.
    """
    if isinstance(image, Image.Image):
        try:
            rgb = _pil_to_rgb(image)
        except DECODE_ERRORS as exc:
            raise InvalidInputError(f"cannot decode or convert the PIL image to RGB ({error_reason(exc)})") from exc
    elif isinstance(image, np.ndarray):
        rgb = _numpy_to_rgb(image)
    elif _is_torch_tensor(image):
        rgb = _tensor_to_rgb(image)
    else:
        raise InvalidInputError(f"{_EXPECTED_FORMS}; got {_describe(image)}")
    _check_min_size(rgb.shape[1], rgb.shape[0], where=None)
    return rgb


def as_rgb_image(
    image: str | os.PathLike[str] | Image.Image | np.ndarray | torch.Tensor, *, max_pixels: int | None = None,
    check_header: HeaderCheck | None = None,
) -> np.ndarray:
    """Convert a `Segmenter` image input into an RGB uint8 array: :func:`to_rgb_uint8`'s forms, a path, HWC tensors.

    Accepted forms, all documented here (house-style §5 "Inputs"):

    - a file path, ``str`` or ``os.PathLike``: decoded by :func:`load_image` exactly as the CLI decodes it (EXIF
      orientation applied, alpha dropped, ...), so a path gives the same pixels as ``PIL.Image.open(path)``;
    - everything :func:`to_rgb_uint8` accepts: a PIL image, a uint8 ``[H, W, 3]`` (or greyscale / RGBA) numpy
      array, a ``[3, H, W]`` tensor;
    - a tensor ``[H, W, 3]``, with the same dtype rule as ``[3, H, W]`` ones: uint8 is read as [0, 255]; a
      floating-point tensor must hold every value in [0, 1] and is scaled by 255 and rounded (ties to even).
      The dtype decides, never the values: a float tensor of [0, 255] data is refused, not guessed.

    Layout of a 3-D tensor: a **leading dimension of 3 always means channel-first** ``[3, H, W]`` (as before
    HWC tensors were accepted); only a tensor whose first dimension is not 3 and whose last one is 3 is read
    as ``[H, W, 3]``. So an ambiguous ``3×3×3`` (or any ``3×W×3``) tensor is channel-first; to pass such an
    image channel-last, pass ``tensor.permute(2, 0, 1)``.

    Bytes are refused (they could be a path or encoded file content); decode content with
    ``load_image(data)``.

    Args:
        image: The input image, in one of the forms above.
        max_pixels: For paths: the decompression-bomb guard of :func:`load_image` (None: its default).
        check_header: For paths: :func:`load_image`'s header check (e.g. the memory guard of
            `talk2dino.data.image_memory`), before any pixel is decoded; for PIL images (``Image.open`` decodes
            nothing yet) the same check on their size and mode, before they are converted; else None.

    Returns:
        ``[H, W, 3]`` uint8 array, RGB, C-contiguous and writable, sharing no memory with the input.

    Raises:
        InvalidInputError: One line naming the problem: a missing or undecodable file, an unsupported type,
            shape or dtype (the message lists the accepted forms), out-of-range values, a side below
            :data:`MIN_IMAGE_SIDE`.
    """
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, max_pixels=max_pixels, check_header=check_header)
    if isinstance(image, (bytes, bytearray, memoryview)):
        raise InvalidInputError(
            f"{_API_FORMS}; got {_describe(image)} (for encoded file content use data.images.load_image(data))"
        )
    if _is_torch_tensor(image):
        import torch  # already imported by the caller: `image` is a tensor

        assert isinstance(image, torch.Tensor)
        shape = tuple(image.shape)
        if len(shape) == 3 and shape[0] != 3 and shape[2] == 3:
            # Checked before permuting, so that the message shows the shape the caller passed.
            if not (image.dtype == torch.uint8 or image.is_floating_point()):
                raise InvalidInputError(f"{_API_FORMS} (uint8, or float in [0, 1]); got {_describe(image)}")
            image = image.permute(2, 0, 1)
        elif len(shape) != 3 or shape[0] != 3:
            raise InvalidInputError(f"{_API_FORMS}; got {_describe(image)}")
        return to_rgb_uint8(image)
    if isinstance(image, Image.Image) and check_header is not None:
        _check_pil_header(image, check_header)
    if isinstance(image, (Image.Image, np.ndarray)):
        return to_rgb_uint8(image)
    raise InvalidInputError(f"{_API_FORMS}; got {_describe(image)}")


def resize_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an RGB uint8 image with OpenCV's bilinear interpolation, as the benchmark protocol does.

    See method.md §4.3, step 2: ``cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)`` on the
    **uint8** array (note that OpenCV's ``dsize`` is width first), with no antialiasing even when downscaling.
    The reference resizes with mmcv's cv2 backend; OpenCV's fixed-point uint8 bilinear kernel is what
    reproduces its resized pixels bit for bit. Resizing in float first is off by up to 0.76 grey levels and PIL
    or antialiased resizing by up to 31, which moves predicted labels; convert to float only after this step.

    Args:
        image: ``[H, W, 3]`` uint8, RGB, values in [0, 255].
        height: Output height in pixels, ≥ 1.
        width: Output width in pixels, ≥ 1.

    Returns:
        ``[height, width, 3]`` uint8, RGB. When the size is unchanged, ``image`` itself is returned (no copy).

    Raises:
        InvalidInputError: ``image`` is not a uint8 ``[H, W, 3]`` array, or the target size is not positive.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InvalidInputError(f"resize_uint8 expects a uint8 HxWx3 RGB numpy array; got {_describe(image)}")
    if height < 1 or width < 1:
        raise InvalidInputError(f"resize target must be at least 1x1 pixels; got height={height}, width={width}")
    if image.shape[0] == height and image.shape[1] == width:
        return image
    # OpenCV needs a contiguous buffer with positive strides (e.g. not a [:, ::-1] view).
    resized = cv2.resize(np.ascontiguousarray(image), (width, height), interpolation=cv2.INTER_LINEAR)
    return np.asarray(resized, dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ helpers
def _check_pil_header(image: Image.Image, check_header: HeaderCheck) -> None:
    """`check_header` on a PIL image's size and mode, its message prefixed with the image's file name (when it
    was opened from a file) as `load_image` prefixes a path's."""
    try:
        check_header(image.width, image.height, image.mode)
    except InvalidInputError as exc:
        own = getattr(image, "filename", None)
        shown = one_line(own, max_chars=1000) if isinstance(own, str) and own else "PIL image"
        kind = ImageTooLargeError if isinstance(exc, ImageTooLargeError) else InvalidInputError
        raise kind(f"{shown}: {exc}") from exc


def _check_min_size(width: int, height: int, *, where: str | None) -> None:
    if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
        prefix = f"{where}: " if where else ""
        raise InvalidInputError(
            f"{prefix}image is {width}x{height} pixels; need at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}"
        )


def _pil_to_rgb(image: Image.Image, *, exif_transpose: bool = True) -> np.ndarray:
    """PIL image of any mode -> ``[H, W, 3]`` uint8 RGB, EXIF orientation optional (see :func:`load_image`)."""
    if exif_transpose:
        image = _exif_transposed(image)
    mode = image.mode
    if mode == "RGB":
        return np.array(image, dtype=np.uint8)
    if mode in _SIXTEEN_BIT_MODES:
        return _gray_to_rgb(_scale_sixteen_bit(np.array(image)))
    if mode == "F":
        return _gray_to_rgb(_float_gray_to_uint8(np.array(image, dtype=np.float64)))
    if mode in ("P", "PA"):
        # Going through RGBA keeps Pillow from warning about palette transparency; the alpha is then dropped.
        image = image.convert("RGBA")
    try:
        converted = image.convert("RGB")
    except ValueError as exc:
        raise InvalidInputError(f"unsupported image mode {mode!r} ({error_reason(exc)})") from exc
    return np.array(converted, dtype=np.uint8)


def _exif_transposed(image: Image.Image) -> Image.Image:
    try:
        transposed = ImageOps.exif_transpose(image)
    except DECODE_ERRORS as exc:
        # A malformed EXIF block should not make the pixels unusable. (OSError here also covers a truncated
        # file, which the decode step reports properly right after.)
        logger.warning("ignoring unreadable EXIF orientation (%s)", error_reason(exc))
        return image
    return image if transposed is None else transposed


def _scale_sixteen_bit(values: np.ndarray) -> np.ndarray:
    """``[H, W]`` integers in [0, 65535] (clipped) -> uint8 ``round(v * 255 / 65535)``, halves up."""
    wide = np.clip(values.astype(np.int64), 0, _SIXTEEN_BIT_MAX)
    return ((wide * _UINT8_MAX + _SIXTEEN_BIT_MAX // 2) // _SIXTEEN_BIT_MAX).astype(np.uint8)


def _float_gray_to_uint8(values: np.ndarray) -> np.ndarray:
    """``[H, W]`` float greyscale -> uint8: [0, 1] is scaled by 255; anything else is read as [0, 255]."""
    if not np.isfinite(values).all():
        raise InvalidInputError("float image contains NaN or infinite values")
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        values = values * _UINT8_MAX
    return np.clip(np.rint(values), 0, _UINT8_MAX).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


def _numpy_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        hint = ""
        if np.issubdtype(array.dtype, np.floating):
            hint = " (float arrays have no agreed range; for values in [0, 1] pass (x * 255).round().astype(np.uint8))"
        raise InvalidInputError(f"{_EXPECTED_FORMS}; got {_describe(array)}{hint}")
    if array.ndim == 2:
        return _gray_to_rgb(array)
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        if array.shape[2] == 1:
            return _gray_to_rgb(array[:, :, 0])
        return np.array(array[:, :, :3], dtype=np.uint8, order="C", copy=True)
    hint = ""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4):
        hint = " (it looks channel-first; pass array.transpose(1, 2, 0))"
    raise InvalidInputError(f"{_EXPECTED_FORMS}; got {_describe(array)}{hint}")


def _is_torch_tensor(obj: object) -> bool:
    # torch is only consulted if the caller already imported it; a tensor cannot exist otherwise.
    torch_module = sys.modules.get("torch")
    return torch_module is not None and isinstance(obj, torch_module.Tensor)


def _tensor_to_rgb(tensor: torch.Tensor) -> np.ndarray:
    import torch

    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise InvalidInputError(f"{_EXPECTED_FORMS}; got {_describe(tensor)}")
    data = tensor.detach().to("cpu")
    if data.dtype == torch.uint8:
        pixels = data
    elif data.is_floating_point():
        values = data.to(torch.float64)
        if not bool(torch.isfinite(values).all()):
            raise InvalidInputError("float image tensor contains NaN or infinite values")
        low, high = float(values.min()), float(values.max())
        if low < 0.0 or high > 1.0:
            raise InvalidInputError(
                f"float image tensors must hold values in [0, 1]; got values in [{low:g}, {high:g}] "
                "(for [0, 255] data pass a uint8 tensor, e.g. x.round().to(torch.uint8))"
            )
        pixels = (values * _UINT8_MAX).round().to(torch.uint8)
    else:
        raise InvalidInputError(f"{_EXPECTED_FORMS}; got {_describe(tensor)}")
    return np.array(pixels.permute(1, 2, 0).numpy(), dtype=np.uint8, order="C", copy=True)


def _describe(obj: object) -> str:
    if isinstance(obj, np.ndarray):
        return f"a numpy array of shape {tuple(obj.shape)} and dtype {obj.dtype}"
    if _is_torch_tensor(obj):
        return f"a tensor of shape {list(obj.shape)} and dtype {obj.dtype}"  # type: ignore[attr-defined]
    return f"an object of type {type(obj).__module__}.{type(obj).__qualname__}"


