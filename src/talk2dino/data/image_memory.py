"""The memory segmenting one image needs, estimated from its header, and the limit it is held to (issue 14).

An image whose estimate exceeds the limit is refused from its header, before any pixel is decoded
(`talk2dino.data.images.load_image`'s ``check_header``), with one line naming the file, its size, the estimate
and the setting to raise. Two entry points use it, with one default limit (`default_image_memory`, half the
machine's memory):

- ``talk2dino segment --max-image-memory`` (`talk2dino.cli.segment`, through `talk2dino.cli.batch`);
- the Python API, ``Segmenter(model, max_image_memory=...)`` (`talk2dino.predictor`), for paths and PIL images
  given to ``set_image`` / ``predict_batch``, and again in ``predict`` with the vocabulary of that call.

Importing this module does not load torch (the CLI's writer processes import `talk2dino.cli.batch`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from talk2dino.config import InferenceConfig
from talk2dino.data.images import ImageTooLargeError
from talk2dino.errors import InvalidInputError

__all__ = ["FALLBACK_IMAGE_MEMORY", "MemoryBudget", "default_image_memory", "format_bytes", "image_memory_limit",
           "machine_memory"]

# Bytes per pixel of the original image, per stage of `segment`, derived from the code and checked against the
# peak RSS of the CLI (tiny test model, CPU, a 4000x3000 greyscale PNG, K = 2 to 50 channels, with and without
# --no-overlay and --save-scores): the estimate is within 10% of the measured growth (the model excluded).
_DECODE_BYTES = 18  # decoding an 8-bit file to RGB: the PIL image, its RGB conversion, the array (L 12, RGBA 18)
_DECODE_BYTES_WIDE = 34  # 16-bit, 32-bit and float modes go through int64/float64 arrays (I;16 26, I 29, F 33)
_WIDE_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
_RGB_BYTES = 3  # the decoded image, kept until its overlay is written
_LABEL_BYTES = 8  # the int64 label map, kept until the files are written
_SCORE_BYTES = 4  # float32 [K, H, W] scores at the original size (the final resize, then the argmax), per channel
_WRITE_BYTES = 15  # label PNG (uint8 copy, PIL image) and overlay (its result, PIL's RGBX copy)
_SAVED_SCORE_BYTES = 6  # --save-scores: the float32 scores again, and their float16 copy, per channel
_SAVE_SCORES_BYTES = 8  # --save-scores: the zip writer's buffers
_PAMR_BLOCKS = 2.6  # PAMR's temporaries, in [K, wh, ww] float32 window blocks (measured)
_ARGMAX_ROWS = 64  # rows per chunk of `ops.sliding.softmax_argmax`, whose masks are [K, 64, W]
_LEGEND_BYTES = 64 * 1024  # one legend row (20 px high, up to ~430 px wide, RGB and PIL's copy)
_HEATMAP_BYTES = 512 * 1024  # one heat-map tile (256 px, RGB, the grid and PIL's copy)

FALLBACK_IMAGE_MEMORY = 8 << 30
"""`default_image_memory` where the machine's memory cannot be read: 8 GiB."""


def format_bytes(size: float) -> str:
    """``4.4 GiB`` (binary units, one decimal above KiB)."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"


def machine_memory() -> int | None:
    """The memory this process may use: physical RAM, or the container's cgroup limit when lower; None when
    neither can be read."""
    total: int | None = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX
        pass
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge number: no limit
            total = int(text) if total is None else min(total, int(text))
    return total if total and total > 0 else None


def image_memory_limit(total: int | None) -> int:
    """The default limit on a machine with `total` bytes of memory (None: unknown): half of it, else 8 GiB.

    Half, because what the limit prevents (the kernel killing the whole run, or swapping for hours) depends on
    this machine's memory, and the model itself, the other images in flight and the system need the rest. A
    fixed size would be too generous on small machines, which are the ones at risk, and needlessly strict on
    big ones.
    """
    return total // 2 if total else FALLBACK_IMAGE_MEMORY


def default_image_memory() -> int:
    """The default limit of ``--max-image-memory`` and of ``Segmenter(max_image_memory=...)``: half the memory
    of the machine (or of its container), else 8 GiB (`image_memory_limit`)."""
    return image_memory_limit(machine_memory())


@dataclass(frozen=True)
class MemoryBudget:
    """The memory limit for segmenting one image, checked from the file's header (`load_image`'s
    ``check_header``) before its pixels are decoded.

    `need` estimates the peak memory one image adds to the process (beyond the model) from its size, the number
    of score channels and the outputs asked for; see the byte counts above. An image above `limit` is refused
    with one line naming its size, the estimate and the setting to raise (`flag`). Images in flight together (a
    batch, the ones being written) add up; the limit is per image.
    """

    limit: int  # bytes one image may need (--max-image-memory)
    channels: int  # score channels: the labels, plus the background channel
    config: InferenceConfig  # short side, long-side cap, window and PAMR of the run
    overlay: bool = True  # writing the overlay
    save_scores: bool = False  # writing --save-scores
    save_heatmaps: bool = False  # writing --save-heatmaps
    flag: str = "--max-image-memory"  # the setting named in the refusal

    def need(self, width: int, height: int, mode: str = "RGB") -> int:
        """Estimated peak bytes for segmenting a `width` x `height` image of PIL `mode`."""
        from talk2dino.ops.sliding import resized_size  # imports torch: only when an image is checked

        k, pixels = self.channels, width * height
        per_pixel = max(
            _DECODE_BYTES_WIDE if mode in _WIDE_MODES else _DECODE_BYTES,
            _LABEL_BYTES + _SCORE_BYTES * k,
            _LABEL_BYTES + (_WRITE_BYTES if self.overlay else 0),
            (_LABEL_BYTES + _SAVED_SCORE_BYTES * k + _SAVE_SCORES_BYTES) if self.save_scores else 0,
        )
        rh, rw = resized_size(height, width, short_side=self.config.short_side,
                              max_long_side=self.config.max_long_side)
        window = min(rh, self.config.window) * min(rw, self.config.window)
        # At the processing size: the stitched canvas, one window's blocks (with PAMR's temporaries), and the
        # argmax's masks over a band of rows of the original width.
        processing = _SCORE_BYTES * k * (rh * rw + window * (1 + (_PAMR_BLOCKS if self.config.pamr else 0)))
        processing += 2 * k * _ARGMAX_ROWS * max(width, height)
        pictures = k * (_LEGEND_BYTES + (_HEATMAP_BYTES if self.save_heatmaps else 0))
        return int(pixels * (_RGB_BYTES + per_pixel) + processing + pictures)

    def __call__(self, width: int, height: int, mode: str = "RGB") -> None:
        """Refuse an image that needs over `limit` (one line; `load_image` prefixes the file name).

        Raises:
            ImageTooLargeError: (an `InvalidInputError`, a ``ValueError``) naming the size, the estimate, the
                limit and the setting to raise.
        """
        need = self.need(width, height, mode)
        if need > self.limit:
            raise ImageTooLargeError(
                f"image is {width}x{height} ({width * height:,} pixels) and needs about {format_bytes(need)} to "
                f"segment with {self.channels} score channel(s), above {self.flag} {format_bytes(self.limit)}; "
                f"raise {self.flag} if the machine has the memory, or downscale the image")

    def check_labels(self) -> None:
        """Refuse before the model loads when even a square image at the processing size (`short_side` pixels a
        side; nearly every image is at least that large when processed) would need over `limit`: too many
        labels for the limit.

        Raises:
            InvalidInputError: naming the label count, the estimate and the flag.
        """
        side = self.config.short_side
        need = self.need(side, side)
        if need > self.limit:
            raise InvalidInputError(
                f"{self.channels:,} score channels need about {format_bytes(need)} even for a {side}x{side} image, "
                f"above {self.flag} {format_bytes(self.limit)}; use fewer labels or raise {self.flag}")
