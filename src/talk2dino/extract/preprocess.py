"""Training-time image preprocessing of `talk2dino extract` (method.md §3.2): decode, resize, centre crop.

Decoding is the package's one decoder (`talk2dino.data.images.load_image`) without EXIF orientation, as the
reference's extraction reads images (COCO's annotations refer to the stored pixels). The resize and crop
reproduce torchvision's ``Resize(size, BICUBIC)`` + ``CenterCrop(size)`` on a PIL image, with their rounding,
so stored features stay byte-comparable with the reference's. `CropDataset` runs this in DataLoader workers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from talk2dino.data.images import load_image
from talk2dino.errors import InvalidInputError
from talk2dino.extract.coco import image_inside
from talk2dino.ops.sliding import resized_size

__all__ = ["CropDataset", "center_crop_box", "collate_crops", "normalize_crops", "read_rgb", "resize_center_crop"]


def read_rgb(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Image.Image:
    """Decode an image file to an RGB PIL image for extraction (the package's decoder, without EXIF orientation).

    `talk2dino.data.images.load_image` with ``exif_transpose=False``: the stored pixel order, as the reference's
    extraction reads it (COCO's annotations and the reference's features refer to the stored pixels);
    greyscale is replicated, CMYK converted by Pillow, alpha dropped. With `root` (the COCO image folder), a path
    whose real location (symlinks resolved) leaves the real `root` is refused unopened
    (`talk2dino.extract.coco.image_inside`).

    Returns:
        An RGB PIL image of the stored pixels.

    Raises:
        InvalidInputError: ``"<path>: <reason>"`` for a missing, unreadable, truncated or non-image file, one
            that is not a regular file (a FIFO would block), or one that resolves outside `root`.
    """
    # The real path is opened: a link out of the image folder (a.jpg -> /etc/passwd) is refused first.
    real = path if root is None else image_inside(path, root)
    return Image.fromarray(load_image(real, name=os.fspath(path), exif_transpose=False))


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """Centre crop box of torchvision's ``CenterCrop(size)`` for an image at least `size` on both sides.

    ``left = int(round((width - size) / 2.0))`` and ``top = int(round((height - size) / 2.0))``, Python's
    round (halves to even): an odd excess of 149 px gives round(74.5) = 74 on the left/top.

    Returns:
        PIL box ``(left, top, left + size, top + size)``.
    """
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def resize_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to `size` (PIL bicubic) and centre-crop to ``size × size`` (method.md §3.2).

    Equal to torchvision's ``Resize(size, BICUBIC)`` followed by ``CenterCrop(size)`` on a PIL image, with
    the rounding of `resized_size` and `center_crop_box`.

    Args:
        image: a PIL image (converted to RGB when it is not).
        size: output side in pixels.

    Returns:
        ``[size, size, 3]`` uint8 array, RGB, values in [0, 255].
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    new_height, new_width = resized_size(rgb.height, rgb.width, short_side=size, rounding="truncate")
    if (new_width, new_height) != rgb.size:
        rgb = rgb.resize((new_width, new_height), Image.Resampling.BICUBIC)
    return np.array(rgb.crop(center_crop_box(rgb.width, rgb.height, size)), dtype=np.uint8)


def normalize_crops(crops: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 crops -> ImageNet-normalised pixels, in the operation order of ``ToTensor`` + ``Normalize``.

    Args:
        crops: ``[B, H, W, 3]`` uint8, RGB, values in [0, 255], on any device.
        mean, std: per-channel statistics of [0, 1] RGB (method.md §2.2).

    Returns:
        ``[B, 3, H, W]`` float32, RGB, ``(x / 255 - mean) / std``, on the device of `crops`.
    """
    pixels = crops.permute(0, 3, 1, 2).float().div(255)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=crops.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=crops.device).view(1, 3, 1, 1)
    return pixels.sub(mean_t).div(std_t)


class CropDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Input position -> (position, ``[S, S, 3]`` uint8 crop or None, error or None); never raises for bad files."""

    def __init__(self, paths: list[str], size: int, root: str | None = None) -> None:
        self.paths = paths
        self.size = size
        self.root = root  # the image folder every path must stay inside (symlinks resolved); None: unchecked

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            crop = resize_center_crop(read_rgb(self.paths[position], self.root), self.size)
        except InvalidInputError as err:
            return position, None, str(err)
        return position, torch.from_numpy(crop), None


def collate_crops(items: list[tuple[int, torch.Tensor | None, str | None]]) -> tuple[
        list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """`CropDataset` items -> (positions of the read images, their ``[B, S, S, 3]`` uint8 crops or None, failures).

    Failures are ``(position, error)`` pairs of the images that could not be read.
    """
    positions = [p for p, crop, _ in items if crop is not None]
    crops = torch.stack([crop for _, crop, _ in items if crop is not None]) if positions else None
    failed = [(p, error or "unreadable") for p, crop, error in items if crop is None]
    return positions, crops, failed
