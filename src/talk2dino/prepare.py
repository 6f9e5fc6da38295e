"""The image side before scoring: an image made ready for the backbone, and what the backbone made of it.

- :func:`prepare_image` -> :class:`PreparedImage`: decode to RGB uint8, resize (OpenCV, uint8; method.md §4.3) and
  cut the window grid. A plain function of the image and the settings, so DataLoader workers can run it.
- :class:`ImageFeatures`: what `Segmenter.set_image` / `Segmenter.embed_images` cache per image (geometry, PAMR
  guides, backbone outputs of every window), from which any vocabulary is answered without the backbone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from talk2dino.config import InferenceConfig
from talk2dino.data.images import resize_uint8, to_rgb_uint8
from talk2dino.models import BackboneOutput
from talk2dino.ops.sliding import resized_size, stitch, window_grid

ImageLike = Any
"""Path, PIL image, ``H×W×3`` uint8 numpy array, ``[3, H, W]`` or ``[H, W, 3]`` tensor; see
`talk2dino.data.images.as_rgb_image`."""


@dataclass
class ImageFeatures:
    """What `Segmenter.set_image` caches: geometry, PAMR guides and backbone outputs of every window.

    Attributes:
        original_size: ``(h, w)`` of the input image.
        resized_size: ``(H, W)`` after the resize rule (method.md §4.3 step 2).
        boxes: ``(y1, y2, x1, x2)`` per window, in resized pixels, row-major.
        guides: ``[n, 3, wh, ww]`` float32 RGB in [0, 255], the windows before normalisation (PAMR guide).
        output: the backbone output of the n windows (``attn_logits [n, M, P]`` etc.).
        embed_seconds: backbone seconds spent on this image: its share (by windows) of the batch it was
            embedded in, or its own call's time when it was embedded alone.
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    boxes: list[tuple[int, int, int, int]]
    guides: torch.Tensor
    output: BackboneOutput
    embed_seconds: float = 0.0

    def dense_features(self) -> torch.Tensor:
        """``[n, h, w, D]`` raw patch tokens per window, for users who want text-aligned maps."""
        n, _, d = self.output.patch_tokens.shape
        return self.output.patch_tokens.reshape(n, *self.output.grid, d)

    @torch.inference_mode()
    def attention_maps(self) -> torch.Tensor:
        """Per-head CLS->patch attention of the last block over the resized image, for pictures.

        Per window: softmax of ``output.attn_logits`` over its P patches (CLS and registers left out, so
        each map sums to 1 over the window), reshaped to the patch grid, upsampled bilinearly to the
        window (``align_corners=True``, as the scores, method.md §4.4) and averaged over overlapping
        windows with the same stitching as the scores (method.md §4.8 step 1).

        Returns:
            ``[M, H', W']`` float32 on CPU, at the resized (processing) size ``resized_size``;
            probabilities in [0, 1], not renormalised after stitching.
        """
        logits = self.output.attn_logits.float()  # [n, M, P]
        n_windows, heads, _ = logits.shape
        maps = torch.softmax(logits, dim=-1).view(n_windows, heads, *self.output.grid)
        maps = F.interpolate(maps, size=tuple(self.guides.shape[-2:]), mode="bilinear", align_corners=True)
        return stitch(maps, self.boxes, *self.resized_size).cpu()


@dataclass
class PreparedImage:
    """An image decoded, resized and cut into windows: the host-side half of `Segmenter.embed_images`.

    Made by :func:`prepare_image` (a plain function of the image and the settings, so DataLoader workers
    can make these in other processes while the device runs the backbone); `pin_memory` lets a CUDA
    DataLoader page-lock the windows for an asynchronous copy.

    Attributes:
        rgb: ``[H, W, 3]`` uint8 RGB, the image as given (outputs are written at this size).
        resized_size: ``(H', W')`` processing size (method.md §4.3).
        boxes: window boxes ``(y1, y2, x1, x2)`` on the resized image.
        guides: ``[n, 3, wh, ww]`` float32 RGB in [0, 255], the windows (backbone input and PAMR guide).
    """

    rgb: np.ndarray
    resized_size: tuple[int, int]
    boxes: list[tuple[int, int, int, int]]
    guides: torch.Tensor

    def pin_memory(self) -> PreparedImage:
        """The same image with its windows in page-locked memory (called by DataLoader ``pin_memory``)."""
        return dataclasses.replace(self, guides=self.guides.pin_memory())


def prepare_image(image: ImageLike, config: InferenceConfig) -> PreparedImage:
    """Convert, resize (uint8, OpenCV; method.md §4.3) and cut the window grid of one image.

    Args:
        image: a PIL image, ``[H, W, 3]``/``[H, W]`` array or ``[3, H, W]`` tensor (see `to_rgb_uint8`).
        config: supplies ``short_side``, ``max_long_side``, ``window`` and ``stride``.

    Raises:
        InvalidInputError: an image that cannot be converted (naming the problem).
    """
    rgb = to_rgb_uint8(image)
    h, w = rgb.shape[:2]
    rh, rw = resized_size(h, w, short_side=config.short_side, max_long_side=config.max_long_side)
    resized = resize_uint8(rgb, rh, rw)
    boxes = window_grid(rh, rw, window=config.window, stride=config.stride)
    # Cast to float only after the uint8 resize (method.md §4.3 step 2).
    full = torch.from_numpy(resized).permute(2, 0, 1).to(torch.float32)
    guides = torch.stack([full[:, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])
    return PreparedImage(rgb=rgb, resized_size=(rh, rw), boxes=boxes, guides=guides)


def resize_scores(stitched: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[C, H', W']`` stitched scores -> ``[C, h, w]`` at the original size: bilinear, align_corners=False
    (method.md §4.8 step 3)."""
    return F.interpolate(stitched[None], size=size, mode="bilinear", align_corners=False)[0]


def chunk_reporter(progress: Callable[[int, int], None], owners: list[int]) -> Callable[[int], None]:
    """``count`` windows done -> ``progress(image, windows)`` per image they belong to (`owners`: window -> image)."""
    position = 0

    def report(count: int) -> None:
        nonlocal position
        done = owners[position:position + count]
        position += count
        for image in dict.fromkeys(done):
            progress(image, done.count(image))

    return report
